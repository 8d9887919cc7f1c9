"""Interactive accuracy: the robot-user rounds of `stm interactive-eval` on the DAVIS-2016
validation sequences of ../shared/data, as a results file for the README.

    python -m bench interactive-eval                        # all 20 sequences, 8 rounds
    python -m bench interactive-eval --sequences blackswan --rounds 3

The model: the small interactive model shipped with the package (trained on synthetic videos
only), or --checkpoint. Frames are segmented at --size (default 240x432 on CPU, 480p on GPU);
J&F is scored at the annotations' full resolution. Time-based scores (AUC, J&F@60s) use the
method's time on the device that ran it.
"""
import pathlib
import sys

from bench import common
from bench.long_video import SHARED_DAVIS


def summary(payload):
    """The settings and the per-sequence table of `stm interactive-eval`."""
    from stm_model.interactive.robot import format_report
    height, width = payload["size"]
    return (f"{payload['root']}: {payload['model_name']}, segmented at {width}x{height}, "
            f"up to {payload['rounds']} rounds, {payload['batch_size']} frames per read; "
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
    parser.add_argument("--sequences", nargs="+")
    parser.add_argument("--checkpoint", help="default: the small interactive model")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    from stm_model.network.checkpoint import load_checkpoint
    from stm_model.demo import SMALL_INTERACTIVE_WEIGHTS, load_small_model
    from stm_model.interactive.robot import evaluate_davis
    if not pathlib.Path(args.root).exists():
        raise SystemExit(f"{args.root} does not exist (../shared/data is needed, or --root)")
    device = common.pick_device(args.device)
    model = (load_checkpoint(args.checkpoint, device) if args.checkpoint
             else load_small_model(SMALL_INTERACTIVE_WEIGHTS, device))
    size = list(args.size or ((480, 854) if device.type == "cuda" else (240, 432)))
    results = evaluate_davis(model, args.root, args.sequences, size=size, rounds=args.rounds,
                             batch_size=args.batch_size,
                             amp_dtype="bf16" if device.type == "cuda" else None)
    payload = common.environment(device)
    payload.update(benchmark="interactive_eval", root=pathlib.Path(args.root).name,
                   model_name=(args.checkpoint or f"small interactive "
                               f"({SMALL_INTERACTIVE_WEIGHTS.name})"),
                   size=size, rounds=args.rounds, batch_size=args.batch_size,
                   max_time=next(iter(results.values()))["max_time"], sequences=results)
    common.finish_run("interactive_eval", payload, plot, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
