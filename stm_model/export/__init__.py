"""An STM as ONNX graphs that onnxruntime runs without PyTorch (`stm export MODEL OUT/ --format
onnx`; the runner is stm_model.deploy.OnnxSegmenter; docs/deploy.md).

    from stm_model.export import to_onnx
    to_onnx("small-real", "small-real-onnx/")   # a shipped name, a checkpoint path or an STM
    to_onnx("small-real", "small-real-int8/", memory_dtype="int8")  # read graphs take int8

The folder's layout and names: stm_model.deploy.manifest. The per-frame graphs (query and
memory encoders, decoder, soft aggregation) are torch.onnx exports of the model's modules
(model_graphs), with the frame size and the object count dynamic; the memory read is written
node by node (read_graphs), in its three forms. Each graph passes onnx.checker before it is
written; the folder is written whole or not at all.
"""
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from stm_kernels._version import __version__
from stm_model.deploy.manifest import (FORMAT_VERSION, GRAPHS, INTERACTIVE_MEMORY_INPUTS,
                                       MANIFEST, MEMORY_DTYPES, READ_GRAPH_NAMES, graph_file,
                                       read_inputs)

MODEL_OPSET = 18
# example sizes of the export (any size works after: the axes are dynamic)
_EXAMPLE_SIZE, _EXAMPLE_OBJECTS = (64, 96), 2


class ExportError(RuntimeError):
    """A model that cannot be exported, with the one-line reason."""


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
    except ImportError as error:
        raise ExportError(f"exporting to ONNX needs the onnx and onnxscript packages ({error}):"
                          " pip install '/path/to/stm-kernels[deploy]' (from a clone)") from None


def to_onnx(model, folder, *, source=None, verbose=False, memory_dtype="fp32"):
    """Write the ONNX graphs of `model` (an STM, a shipped model's name or a checkpoint path)
    into `folder` (created; an existing export there is replaced); returns the manifest (a
    dict). source: what the manifest names as the model (default: the name or path given).
    memory_dtype: the memory the read graphs take, "fp32" or "int8" (int8 keys and values with
    float32 scales, dequantised in the graph: stm_model.export.read_graphs); the manifest
    records it and the runner keeps its memory so. ExportError, in one line, for what cannot
    be exported."""
    if memory_dtype not in MEMORY_DTYPES:
        raise ValueError(f"memory_dtype must be one of {', '.join(MEMORY_DTYPES)} (an ONNX "
                         f"export has no other memory); got {memory_dtype!r}")
    _require_onnx()
    import torch

    from stm_model.network.checkpoint import load_checkpoint
    if not isinstance(model, torch.nn.Module):
        source = source or str(model)
        model = load_checkpoint(model)
    model = model.float().eval()
    folder = Path(folder)
    config = model.config
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or
                                                     (folder / MANIFEST).is_file())):
        raise ExportError(f"{folder} exists and is not an ONNX export: choose an empty or new "
                          "folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        opsets = _write_graphs(model, staging, verbose, memory_dtype)
        manifest = {
            "format_version": FORMAT_VERSION, "stm_kernels_version": __version__,
            "source": source or "an STM given in Python",
            "key_dim": config.key_dim, "value_dim": config.value_dim,
            "similarity": config.similarity, "internal_size": config.internal_size,
            "interactive": config.interactive, "backbone": config.backbone,
            "memory_dtype": memory_dtype,
            "graphs": {name: {"file": graph_file(name), "opset": opsets[name],
                              "inputs": list(_inputs(name, config, memory_dtype)),
                              "outputs": list(GRAPHS[name][1])} for name in GRAPHS},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _inputs(name, config, memory_dtype="fp32"):
    if name == "memory_encoder" and config.interactive:
        return INTERACTIVE_MEMORY_INPUTS
    if name in READ_GRAPH_NAMES:
        return read_inputs(memory_dtype)
    return GRAPHS[name][0]


def _write_graphs(model, folder, verbose, memory_dtype):
    """Every graph of GRAPHS into folder; returns {name: opset}."""
    import onnx
    import torch

    from stm_model.export import model_graphs, read_graphs
    config = model.config
    height, width = _EXAMPLE_SIZE
    n = _EXAMPLE_OBJECTS
    h, w = height // 16, width // 16
    frame = torch.rand(1, 3, height, width)
    probs = torch.rand(n, height, width)
    with torch.no_grad():
        query = model.encode_query(frame)
    readout = torch.rand(n, config.value_dim, h, w)
    memory_inputs = (frame, probs) + ((torch.zeros(n, 2, height, width),)
                                      if config.interactive else ())
    rows, cols = torch.export.Dim("height16", max=1024), torch.export.Dim("width16", max=1024)
    objects = torch.export.Dim("objects", max=255)
    full = {2: 16 * rows, 3: 16 * cols}
    stride16 = {2: rows, 3: cols}
    planes = {1: 16 * rows, 2: 16 * cols}
    exports = {
        "query_encoder": (model_graphs.QueryEncoder(model), (frame,), {"frame": full}),
        "memory_encoder": (model_graphs.MemoryEncoder(model), memory_inputs,
                           {"frame": full, "object_probs": {0: objects, **planes},
                            **({"scribbles": {0: objects, 2: 16 * rows, 3: 16 * cols}}
                               if config.interactive else {})}),
        "decoder": (model_graphs.Decoder(model), (readout, query.value, query.r3, query.r2),
                    {"readout": {0: objects, **stride16}, "value": stride16,
                     "r3": {2: 2 * rows, 3: 2 * cols}, "r2": {2: 4 * rows, 3: 4 * cols}}),
        "aggregate": (model_graphs.Aggregate(), (probs,),
                      {"foreground": {0: objects, **planes}}),
    }
    opsets = {}
    for name, (module, inputs, dynamic) in exports.items():
        path = folder / graph_file(name)
        input_names = list(_inputs(name, config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module.eval(), inputs, path, dynamo=True,
                                  input_names=input_names, output_names=list(GRAPHS[name][1]),
                                  dynamic_shapes=dict(zip(input_names, dynamic.values(),
                                                          strict=True)),
                                  opset_version=MODEL_OPSET, external_data=False,
                                  verbose=verbose)
            except Exception as error:  # torch.export's errors run to pages
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise ExportError(f"the {name} of this model cannot be exported to ONNX: "
                                  f"{type(error).__name__}: {first}") from error
        model.eval()  # the exporter may leave modules in training mode
        onnx.checker.check_model(onnx.load(path), full_check=True)
        opsets[name] = MODEL_OPSET
    for name, build in read_graphs.READ_GRAPHS.items():
        graph = build(config.key_dim, config.value_dim, config.similarity, memory_dtype)
        onnx.save(graph, folder / graph_file(name))
        opsets[name] = graph.opset_import[0].version
    return opsets
