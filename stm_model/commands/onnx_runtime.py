"""`stm segment --runtime onnxruntime`: the run on an ONNX export (stm_model.deploy) instead of
the torch segmenter; the command's frames, masks, resume and outputs are the same code for both
runtimes (stm_model.inference.directions drives either). Imports no torch: this is the path
that runs where PyTorch is not installed."""
import hashlib
import sys

from stm_model.cli import UsageError, torch_available
from stm_model.commands.common import DEFAULT_CHECKPOINT
from stm_model.deploy.manifest import ExportFolderError, is_export_folder

RUNTIMES = ("torch", "onnxruntime")
# flags of the torch segmenter that the ONNX runner does not have, and the values it takes
# (their defaults; --amp auto and fp32 too: the runner's network is float32)
ONNX_MEMORY_DTYPES = ("auto", "fp32", "int8")  # what the ONNX read graphs take (export)
TORCH_ONLY = {"amp_dtype": ("--amp", ("auto", "fp32", None)),
              "read_backend": ("--backend", (None,)), "offload": ("--offload", (False,)),
              "offload_chunk_frames": ("--offload-chunk-frames", (64,))}


def check_onnx_arguments(args):
    """UsageError for flags the ONNX runner does not take, before any work."""
    if args.runtime != "onnxruntime":
        if args.onnx_read is not None:
            raise UsageError("--onnx-read applies with --runtime onnxruntime")
        return
    for name, (flag, taken) in TORCH_ONLY.items():
        if getattr(args, name, taken[0]) not in taken:
            raise UsageError(f"{flag} applies to the torch runtime, not to --runtime "
                             "onnxruntime")
    if args.memory_dtype not in ONNX_MEMORY_DTYPES:
        raise UsageError(f"--memory-dtype: the ONNX runner keeps its memory in float32 or int8, "
                         f"not {args.memory_dtype} (use --memory-dtype fp32 or int8, or "
                         "--runtime torch)")
    if args.random_weights:
        raise UsageError("--random-weights applies to the torch runtime")
    if args.device not in ("auto", "cpu"):
        raise UsageError("--device: the ONNX runner runs on onnxruntime's CPU provider (drop "
                         "--device)")
    name = args.checkpoint or DEFAULT_CHECKPOINT
    if not is_export_folder(name) and not torch_available():
        raise UsageError(f"--checkpoint {name}: without PyTorch the ONNX runner needs an "
                         "exported model, a folder written by `stm export MODEL FOLDER` where "
                         "PyTorch is installed (docs/deploy.md); give --checkpoint FOLDER")


def _memory_dtype(args):
    """The memory dtype asked of the runner: "fp32" or "int8", None for auto (an export
    folder's own; float32 for a model exported here)."""
    return None if args.memory_dtype == "auto" else args.memory_dtype


def export_folder(args):
    """The ONNX export to run: --checkpoint itself when it is an export folder, else the
    checkpoint exported once into the user cache for the memory dtype asked (keyed by the
    file's content and that dtype)."""
    name = args.checkpoint or DEFAULT_CHECKPOINT
    if is_export_folder(name):
        return name
    from stm_model.commands.models import checkpoint_path
    from stm_model.export import ExportError, to_onnx
    from stm_model.network.checkpoint import cache_dir
    path = checkpoint_path(name, show_progress=not args.quiet)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    memory_dtype = _memory_dtype(args) or "fp32"
    suffix = "" if memory_dtype == "fp32" else f"-{memory_dtype}"  # fp32: the folders as before
    folder = cache_dir() / "onnx" / f"{path.stem}-{digest}{suffix}"
    if not is_export_folder(folder):
        print(f"note: exporting {name} to ONNX once ({memory_dtype} memory), into {folder}",
              file=sys.stderr)
        try:
            to_onnx(path, folder, source=str(name), memory_dtype=memory_dtype)
        except ExportError as error:
            raise UsageError(str(error)) from None
    return folder


def onnx_segmenter(args, options):
    """The run's OnnxSegmenter, from the parsed flags."""
    from stm_model.deploy import OnnxSegmenter
    try:
        segmenter = OnnxSegmenter(export_folder(args), options.mem_every,
                                  read=args.onnx_read or "chunk",
                                  max_memory_frames=options.max_memory_frames,
                                  max_internal_size=options.max_internal_size,
                                  memory_dtype=_memory_dtype(args))
    except (ExportFolderError, ImportError) as error:
        raise UsageError(str(error)) from None
    return segmenter
