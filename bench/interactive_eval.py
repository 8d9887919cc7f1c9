"""Interactive accuracy: the robot-user rounds of `stm interactive-eval` on the DAVIS-2016
validation sequences of ../shared/data, as a results file for the README.

    python -m bench interactive-eval                        # the ten test sequences, 8 rounds
    python -m bench interactive-eval --sequences blackswan --rounds 3

The model: --checkpoint, by default small-real-interactive (shipped with the package). On a
root holding DAVIS-2016's ten test sequences (bench.davis_test.TEST_SEQUENCES) those are the
default, since the shipped real-video models train on the other ten; on another root, every
sequence. Frames are segmented at the model's own internal size (STMConfig.internal_size),
else at --size (default 240x432 on CPU, 480p on GPU); J&F is scored at the annotations' full
resolution. Time-based scores (AUC, J&F@60s) use the method's time on the device that ran it.
"""
import pathlib
import sys

from bench import common
from bench.davis_test import TEST_SEQUENCES
from bench.long_video import SHARED_DAVIS

DEFAULT_CHECKPOINT = "small-real-interactive"


def summary(payload):
    """The settings and the per-sequence table of `stm interactive-eval`."""
    from stm_model.interactive.robot import format_report
    if payload.get("size"):
        height, width = payload["size"]
        where = f"segmented at {width}x{height}"
    else:
        where = f"segmented at internal size {payload['internal_size']} (shorter side)"
    reads = (f"propagated with a memory frame every {payload['mem_every']}"
             if payload.get("mem_every") else f"{payload['batch_size']} frames per read")
    return (f"{payload['root']}: {payload['model_name']}, {where}, "
            f"up to {payload['rounds']} rounds, {reads}; "
            f"AUC over 0-{payload['max_time']:g} s per object.\n\n"
            + format_report(payload["sequences"]))


def plot(payload, path):
    """J&F against time and against the round; returns [path]."""
    from stm_model.interactive.robot import plot_curves
    return [plot_curves(payload["sequences"], pathlib.Path(path).with_suffix(".png"))]


def main(argv=None):
    """`python -m bench interactive-eval`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, "python -m bench interactive-eval")
    parser.add_argument("--root", default=str(SHARED_DAVIS), help="a DAVIS-format root")
    parser.add_argument("--sequences", nargs="+",
                        help="default: the ten DAVIS-2016 test sequences where the root holds "
                             "them, else all")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"a shipped model's name or a file (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mem-every", type=int,
                        help="propagate each round from the annotated frames, memorising every "
                             "N-th predicted frame (InteractiveSession's mem_every; default: "
                             "the annotated frames alone)")
    args = parser.parse_args(argv)
    from stm_model.network.checkpoint import load_checkpoint, resolve_checkpoint
    from stm_model.interactive.robot import evaluate_davis
    if not pathlib.Path(args.root).exists():
        raise SystemExit(f"{args.root} does not exist (../shared/data is needed, or --root)")
    device = common.pick_device(args.device)
    model = load_checkpoint(resolve_checkpoint(args.checkpoint), device)
    sequences = args.sequences or _test_sequences(args.root)
    internal = None if args.size else model.config.internal_size
    size = None if internal else list(
        args.size or ((480, 854) if device.type == "cuda" else (240, 432)))
    results = evaluate_davis(model, args.root, sequences, size=size, rounds=args.rounds,
                             batch_size=args.batch_size, mem_every=args.mem_every,
                             amp_dtype="bf16" if device.type == "cuda" else None)
    payload = common.environment(device)
    payload.update(benchmark="interactive_eval", root=pathlib.Path(args.root).name,
                   model_name=args.checkpoint, size=size, internal_size=internal,
                   rounds=args.rounds, batch_size=args.batch_size, mem_every=args.mem_every,
                   max_time=next(iter(results.values()))["max_time"], sequences=results)
    common.finish_run("interactive_eval", payload, plot, summary)
    return 0


def _test_sequences(root):
    """The ten DAVIS-2016 test sequences when root holds them all, else None (every one)."""
    folder = pathlib.Path(root) / "JPEGImages" / "480p"
    if all((folder / name).is_dir() for name in TEST_SEQUENCES):
        return list(TEST_SEQUENCES)
    return None


if __name__ == "__main__":
    sys.exit(main())
