"""Where the model runs: device names and peak memory, the CPU allocator setting, and
torch.distributed for inference over several processes."""
