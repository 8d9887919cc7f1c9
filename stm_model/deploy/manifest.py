"""What an ONNX export folder holds (`stm export MODEL OUT/ --format onnx`), shared by the exporter
and the runner: the graphs' files, their input and output names, and the manifest that says
which model they are. Imports neither torch nor onnxruntime.

    OUT/stm_onnx.json        the manifest (MANIFEST): model sizes, graphs, opsets
    OUT/query_encoder.onnx   frame (1, 3, H, W) -> key, value, r3, r2
    OUT/memory_encoder.onnx  frame, object_probs (n, H, W) [, scribbles] -> key, value
    OUT/decoder.onnx         readout (n, Cv, h, w), value, r3, r2 -> foreground (n, H, W)
    OUT/aggregate.onnx       foreground (n, H, W) -> probs (n + 1, H, W), background first
    OUT/read.onnx            the whole memory read (the Attention operator)
    OUT/read_matmul.onnx     the whole memory read (MatMul, Softmax, MatMul)
    OUT/read_chunk.onnx      one chunk's read-out and log-sum-exp, merged by the runner

H and W are multiples of 16 (the runner pads frames as the torch segmenter does); h = H / 16.
"""
import json
from pathlib import Path

MANIFEST = "stm_onnx.json"
FORMAT_VERSION = 1

# graph name -> (input names, output names)
GRAPHS = {
    "query_encoder": (("frame",), ("key", "value", "r3", "r2")),
    "memory_encoder": (("frame", "object_probs"), ("key", "value")),
    "decoder": (("readout", "value", "r3", "r2"), ("foreground",)),
    "aggregate": (("foreground",), ("probs",)),
    "read": (("query_key", "memory_key", "memory_value"), ("readout",)),
    "read_matmul": (("query_key", "memory_key", "memory_value"), ("readout",)),
    "read_chunk": (("query_key", "memory_key", "memory_value"), ("readout", "lse")),
}
INTERACTIVE_MEMORY_INPUTS = ("frame", "object_probs", "scribbles")
READ_FORMS = ("chunk", "whole")  # the runner's read: read_chunk, or read (read_matmul)


class ExportFolderError(ValueError):
    """A folder that is not a complete ONNX export of this format."""


def graph_file(name):
    """The file name of graph `name` in an export folder."""
    return f"{name}.onnx"


def is_export_folder(path):
    """Whether path is a folder holding an export manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder):
    """The manifest (a dict) of an export folder, checked: ExportFolderError naming what is
    missing or of another format version."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportFolderError(f"{folder} is not an ONNX export of an STM (no {MANIFEST}); "
                                f"write one with: stm export MODEL {folder} --format onnx")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportFolderError(f"{path} is format version {manifest.get('format_version')}; "
                                f"this stm-kernels reads version {FORMAT_VERSION}: export the "
                                "model again")
    missing = [graph_file(name) for name in manifest["graphs"]
               if not (folder / graph_file(name)).is_file()]
    if missing:
        raise ExportFolderError(f"{folder} lacks {', '.join(missing)}: export the model again")
    return manifest
