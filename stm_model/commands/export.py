"""`stm export`: a checkpoint rewritten as weights only."""
import pathlib

from stm_kernels.options import DTYPES

from stm_model.network.checkpoint import load_checkpoint, save_checkpoint


def export_weights(args):
    """`stm export`: weights-only checkpoint, in the requested dtype."""
    dtype = None if args.dtype == "fp32" else DTYPES[args.dtype]  # fp32: as stored
    save_checkpoint(load_checkpoint(args.source), args.target, weights_dtype=dtype)
    size = pathlib.Path(args.target).stat().st_size
    print(f"wrote {args.target} ({size / 2**20:.1f} MiB, {args.dtype})")
    return 0
