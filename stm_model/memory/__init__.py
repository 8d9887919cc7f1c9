"""The memory of a segmentation: the bank of keys and values and its storage (on the device,
offloaded to CPU RAM, sharded over ranks), which frames it keeps, the per-frame query cache, and
the memory of several videos batched together."""
