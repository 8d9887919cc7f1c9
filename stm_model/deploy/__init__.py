"""Deploying a segmenter without PyTorch: OnnxSegmenter runs an ONNX export (stm_model.export,
`stm export MODEL OUT/ --format onnx`) with onnxruntime, numpy and PIL (docs/deploy.md).

    from stm_model.deploy import OnnxSegmenter
    seg = OnnxSegmenter("small-real-onnx/")
    probs = seg.step(frame, mask=labels)     # then seg.step(frame) for every later frame

Importing this package imports neither torch nor onnxruntime (the latter on first use).
"""
from stm_model.deploy.segmenter import OnnxSegmenter

__all__ = ["OnnxSegmenter"]
