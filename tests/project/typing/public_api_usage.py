"""Type-checked by tests/project/test_typing.py (not run): the public API as a user's code calls it.
Each reveal_type's expected result is checked by the test."""
import torch

from stm_kernels import memory_read, memory_usage, merge_reads
from stm_model import (FrameSequence, InteractiveSession, MemoryBank, VideoSegmenter,
                       load_checkpoint, segment_both_directions)

query = torch.randn(1, 64, 8, 8)
keys, values = torch.randn(2, 64, 3, 8, 8), torch.randn(2, 32, 3, 8, 8)

out = memory_read(query, keys, values)
reveal_type(out)  # expect: Tensor
chunked = memory_read(query, [keys, keys], [values, values], similarity="l2", top_k=20)
reveal_type(chunked)  # expect: Tensor
with_lse = memory_read(query, keys, values, return_lse=True)
reveal_type(with_lse)  # expect: Tensor | tuple[Tensor, ...]
merged = merge_reads([out, out], [torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)])
reveal_type(merged)  # expect: tuple[Tensor, Tensor]
usage = memory_usage(query, keys, torch.zeros(2, 8, 8), memory_lengths=[100, 192])
reveal_type(usage)  # expect: Tensor

model = load_checkpoint("model.pt")
reveal_type(model)  # expect: STM
segmenter = VideoSegmenter(model, memory_dtype="fp16", max_internal_size=480, compile=True)
probs = segmenter.step(torch.rand(3, 480, 854), mask=torch.zeros(480, 854, dtype=torch.int64))
reveal_type(probs)  # expect: Tensor
reveal_type(segmenter.remove_objects([2], probs))  # expect: Tensor | None
for result in segment_both_directions(segmenter, FrameSequence("clip.mp4"), {40: probs}):
    reveal_type(result.index)  # expect: int
    reveal_type(result.labels)  # expect: Tensor
bank = MemoryBank(2, 128, 512, 30, 54, dtype=torch.float16)
reveal_type(bank.read(query))  # expect: Tensor
session = InteractiveSession(model, torch.rand(10, 3, 64, 64), 2)
reveal_type(session.interact({}))  # expect: Tensor
