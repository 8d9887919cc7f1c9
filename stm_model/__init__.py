"""stm_model: the STM network and everything model-side (checkpoint loading, the streaming
video segmenter and its memory bank, DAVIS I/O, J&F metrics, training, demo, CLI).

Built on `stm_kernels.memory_read`; the network itself lands with the model issue.
"""
