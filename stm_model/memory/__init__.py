"""The memory of a segmentation: the bank of keys and values, which frames it keeps, the
per-frame query cache, and the memory of several videos batched together."""
