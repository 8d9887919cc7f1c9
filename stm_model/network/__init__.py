"""The STM network (encoders, memory read, decoder) and its checkpoints."""
