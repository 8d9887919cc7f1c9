"""`stm export`: a checkpoint rewritten as weights only, or as ONNX graphs."""
import pathlib

from stm_kernels.options import DTYPES

from stm_model.cli import UsageError
from stm_model.commands.models import checkpoint_path
from stm_model.network.checkpoint import load_checkpoint, save_checkpoint

WEIGHTS_SUFFIXES = (".pt", ".pth")


def export(args):
    """`stm export`: the weights file or the ONNX folder (--format; auto: by TARGET's suffix)."""
    onnx = args.format == "onnx" or (args.format == "auto" and pathlib.Path(
        args.target).suffix not in WEIGHTS_SUFFIXES)
    return export_onnx(args) if onnx else export_weights(args)


def export_weights(args):
    """`stm export --format weights`: weights-only checkpoint, in the requested dtype."""
    if args.memory_dtype != "fp32":
        raise UsageError("--memory-dtype applies to ONNX exports (a folder TARGET, or "
                         "--format onnx): a weights file holds no memory")
    dtype = None if args.dtype == "fp32" else DTYPES[args.dtype]  # fp32: as stored
    save_checkpoint(load_checkpoint(checkpoint_path(args.source)), args.target,
                    weights_dtype=dtype)
    size = pathlib.Path(args.target).stat().st_size
    print(f"wrote {args.target} ({size / 2**20:.1f} MiB, {args.dtype})")
    return 0


def export_onnx(args):
    """`stm export --format onnx`: the folder of ONNX graphs (stm_model.export.to_onnx)."""
    from stm_model.export import ExportError, to_onnx
    if args.dtype != "fp32":
        raise UsageError("--dtype applies to weights files: ONNX graphs are float32 (drop "
                         "--dtype, or name a .pt TARGET)")
    path = checkpoint_path(args.source)
    try:
        manifest = to_onnx(path, args.target, source=args.source,
                           memory_dtype=args.memory_dtype)
    except ExportError as error:
        raise UsageError(str(error)) from None
    target = pathlib.Path(args.target)
    size = sum(f.stat().st_size for f in target.iterdir())
    graphs = ", ".join(f"{name} (opset {graph['opset']})"
                       for name, graph in manifest["graphs"].items())
    print(f"wrote {target}/ ({size / 2**20:.1f} MiB, {args.memory_dtype} memory): {graphs}")
    return 0
