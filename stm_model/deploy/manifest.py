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
The manifest's memory_dtype (MEMORY_DTYPES; a manifest without it: "fp32") is the memory the
read graphs take: float32 keys and values, or "int8" keys and values with float32 scales
(QUANTIZED_READ_INPUTS), the torch bank's 8-bit format.
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
READ_GRAPH_NAMES = ("read", "read_matmul", "read_chunk")
# the memory the read graphs take: float32, or int8 with scales (stm_kernels.QuantizedMemory's
# int8 format: keys one scale per object, channel and frame, values one per object and position)
MEMORY_DTYPES = ("fp32", "int8")
QUANTIZED_READ_INPUTS = ("query_key", "memory_key", "memory_value", "key_scale", "value_scale")
# the ONNX element type of the memory inputs (onnxruntime's type names), per memory dtype
MEMORY_TENSOR_TYPES = {"fp32": "tensor(float)", "int8": "tensor(int8)"}
_TYPE_WORDS = {"tensor(float)": "float32", "tensor(int8)": "int8"}
READ_FORMS = ("chunk", "whole")  # the runner's read: read_chunk, or read (read_matmul)


class ExportFolderError(ValueError):
    """A folder that is not a complete ONNX export of this format."""


def graph_file(name):
    """The file name of graph `name` in an export folder."""
    return f"{name}.onnx"


def read_inputs(memory_dtype):
    """The input names of the read graphs for a memory of memory_dtype (MEMORY_DTYPES)."""
    return QUANTIZED_READ_INPUTS if memory_dtype == "int8" else GRAPHS["read"][0]


def memory_dtype_of(manifest):
    """The memory dtype an export's read graphs take ("fp32" where the manifest predates the
    field)."""
    return manifest.get("memory_dtype", "fp32")


def is_export_folder(path):
    """Whether path is a folder holding an export manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder):
    """The manifest (a dict) of an export folder, checked: ExportFolderError, in one line
    naming the file, for a missing or malformed manifest, another format version, a missing
    graph, or a graph whose file is not ONNX or whose opset is not the manifest's."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportFolderError(f"{folder} is not an ONNX export of an STM (no {MANIFEST}); "
                                f"write one with: stm export MODEL {folder} --format onnx")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportFolderError(f"{path} is not JSON ({error}): export the model again"
                                ) from None
    if not isinstance(manifest, dict):
        raise ExportFolderError(f"{path} is malformed (not a JSON object): export the model "
                                "again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportFolderError(f"{path} is format version {manifest.get('format_version')}; "
                                f"this stm-kernels reads version {FORMAT_VERSION}: export the "
                                "model again")
    _check_fields(manifest, path)
    missing = [graph_file(name) for name in manifest["graphs"]
               if not (folder / graph_file(name)).is_file()]
    if missing:
        raise ExportFolderError(f"{folder} lacks {', '.join(missing)}: export the model again")
    for name, graph in manifest["graphs"].items():
        opset = graph_opsets(folder / graph_file(name)).get("", 1)
        if opset != graph["opset"]:
            raise ExportFolderError(f"{folder / graph_file(name)} is of opset {opset} but "
                                    f"{path} says {graph['opset']}: not this export's graph; "
                                    "export the model again")
    return manifest


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# manifest key -> (check, what it must be)
_FIELDS = {
    "key_dim": (_positive_int, "a positive integer"),
    "value_dim": (_positive_int, "a positive integer"),
    "similarity": (lambda value: value in ("dot", "l2"), "dot or l2"),
    "internal_size": (lambda value: value is None or _positive_int(value),
                      "a positive integer or null"),
    "interactive": (lambda value: isinstance(value, bool), "true or false"),
    "graphs": (lambda value: isinstance(value, dict) and set(value) == set(GRAPHS),
               f"an object naming the graphs {', '.join(GRAPHS)}"),
}
# optional manifest keys (absent in earlier exports) -> (check, what it must be)
_OPTIONAL_FIELDS = {
    "memory_dtype": (lambda value: value in MEMORY_DTYPES, " or ".join(MEMORY_DTYPES)),
}


def _check_fields(manifest, path):
    """ExportFolderError naming the manifest's first missing or malformed field."""
    for key, (valid, what) in _FIELDS.items():
        if key not in manifest or not valid(manifest[key]):
            found = "missing" if key not in manifest else repr(manifest[key])[:60]
            raise ExportFolderError(f"{path} is malformed: {key} must be {what}; got {found}. "
                                    "Export the model again")
    for key, (valid, what) in _OPTIONAL_FIELDS.items():
        if key in manifest and not valid(manifest[key]):
            raise ExportFolderError(f"{path} is malformed: {key} must be {what}; got "
                                    f"{repr(manifest[key])[:60]}. Export the model again")
    for name, graph in manifest["graphs"].items():
        if not (isinstance(graph, dict) and _positive_int(graph.get("opset")) and
                isinstance(graph.get("inputs"), list) and
                isinstance(graph.get("outputs"), list)):
            raise ExportFolderError(f"{path} is malformed: graphs.{name} must have an opset, "
                                    "inputs and outputs. Export the model again")


# (graph, input or output name) -> the manifest's size of its channel axis (axis 1)
CHANNELS = {
    ("query_encoder", "key"): "key_dim", ("query_encoder", "value"): "value_dim",
    ("memory_encoder", "key"): "key_dim", ("memory_encoder", "value"): "value_dim",
    ("decoder", "readout"): "value_dim", ("decoder", "value"): "value_dim",
    **{(read, name): size for read in READ_GRAPH_NAMES
       for name, size in (("query_key", "key_dim"), ("memory_key", "key_dim"),
                          ("memory_value", "value_dim"), ("readout", "value_dim"),
                          ("key_scale", "key_dim"))},
}


def check_graph_interface(path, name, manifest, inputs, outputs, input_types=None):
    """ExportFolderError unless graph `name` (file `path`) has the inputs and outputs the
    manifest lists, with its key and value sizes, and (a read graph, given input_types) takes
    the manifest's memory dtype. inputs, outputs: [(name, shape)] as the runtime reads them
    from the graph (onnxruntime's get_inputs(), a symbolic axis a str); input_types: {name:
    onnxruntime's type name, "tensor(float)", "tensor(int8)"}."""
    listed = manifest["graphs"][name]
    if name in READ_GRAPH_NAMES and input_types is not None:
        dtype = memory_dtype_of(manifest)
        taken = sorted({_TYPE_WORDS.get(input_types.get(entry), str(input_types.get(entry)))
                        for entry in ("memory_key", "memory_value")})
        if taken != [_TYPE_WORDS[MEMORY_TENSOR_TYPES[dtype]]]:
            raise ExportFolderError(f"{path} takes a {'/'.join(taken)} memory but the "
                                    f"manifest's memory_dtype is {dtype}: a graph exported for "
                                    "another memory dtype; export the model again")
    for kind, found, expected in (("inputs", inputs, listed["inputs"]),
                                  ("outputs", outputs, listed["outputs"])):
        names = [entry for entry, _ in found]
        if names != list(expected):
            raise ExportFolderError(f"{path} has the {kind} {names}, but the manifest lists "
                                    f"{list(expected)}: not this export's graph; export the "
                                    "model again")
    for entry, shape in [*inputs, *outputs]:
        size = CHANNELS.get((name, entry))
        if size is not None and len(shape) > 1 and shape[1] != manifest[size]:
            raise ExportFolderError(f"{path}: {entry} has {shape[1]} channels but the "
                                    f"manifest's {size} is {manifest[size]}: not this export's "
                                    "graph; export the model again")


def graph_opsets(path):
    """{domain: opset version} of an ONNX file's opset_import ("" is the default domain),
    read from the ModelProto's top-level fields alone (onnx need not be installed);
    ExportFolderError naming the file when it is not an ONNX model."""
    data = Path(path).read_bytes()
    opsets, position = {}, 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, position = _varint(data, position)
            elif wire == 2:
                length, position = _varint(data, position)
                if position + length > len(data):
                    raise ValueError("a field runs past the end of the file")
                if field == _OPSET_IMPORT:
                    domain, version = _operator_set(data[position:position + length])
                    opsets[domain] = version
                position += length
            elif wire in (1, 5):  # fixed 64 and 32 bits
                position += 8 if wire == 1 else 4
            else:
                raise ValueError(f"wire type {wire}")
        if not opsets or position != len(data):
            raise ValueError("no opset_import")
    except (ValueError, IndexError, UnicodeDecodeError) as error:
        raise ExportFolderError(f"{path} is not an ONNX model ({error}): corrupt or "
                                "truncated; export the model again") from None
    return opsets


_OPSET_IMPORT = 8  # ModelProto.opset_import; OperatorSetIdProto: domain = 1, version = 2


def _varint(data, position):
    """(value, next position) of the protobuf varint at position."""
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 64 bits")


def _operator_set(data):
    """(domain, version) of an OperatorSetIdProto."""
    domain, version, position = "", None, 0
    while position < len(data):
        key, position = _varint(data, position)
        if key == (1 << 3) | 2:
            length, position = _varint(data, position)
            domain = data[position:position + length].decode()
            position += length
        elif key == (2 << 3) | 0:
            version, position = _varint(data, position)
        else:
            raise ValueError("an unexpected field in opset_import")
    if version is None:
        raise ValueError("an opset_import without a version")
    return domain, version
