"""The `stm` command line: segment a video with STM, evaluate results with DAVIS J&F.

    stm segment FRAMES_DIR_OR_VIDEO --mask FIRST_MASK.png --checkpoint STM_weights.pth
    stm segment video.mp4 --masks MASKS_DIR --output out/ --mem-every 5 --memory-dtype fp16
    stm segment-dataset DAVIS_ROOT --output out/ --batch-size 8 --eval   # every sequence
    torchrun --nproc_per_node 2 -m stm_model segment-dataset DAVIS_ROOT --output out/
    stm eval RESULTS_DIR ANNOTATIONS_DIR
    stm interactive-eval DAVIS_ROOT --sequences bear --rounds 8 --size 240
    stm annotate FRAMES_DIR_OR_VIDEO --output out/     # a page to scribble on, in a browser
    stm train --output runs/small --steps 3000

User errors (bad options, unreadable or ambiguous inputs, unwritable outputs) are reported as
one line, `stm <command>: error: <message>`, with exit code 2; never a traceback.

This module holds the parsers and the dispatch; what a command does is in its module of
stm_model.commands, imported once the arguments are parsed (so `stm --help` imports no torch).
Where PyTorch is not installed (the torch-free distribution, stm-kernels-onnx: docs/deploy.md),
`stm segment --runtime onnxruntime` and `stm eval` run, and the other commands say in one line
that they need PyTorch.
An option means the same in every command that has it (`--size PIXELS`: the shorter side the
network works at).
"""
import argparse
import importlib
import importlib.metadata
import os
import re
import sys

from stm_kernels import __version__
from stm_kernels._lazy_imports import TORCH_MISSING, torch_available
from stm_kernels.options import BACKENDS, DTYPE_NAMES
from stm_kernels import selftest_options

from stm_model.inference import options as options_module
from stm_model.inference.options import DEFAULT_MAX_OBJECTS, MASK_POLICIES
from stm_model.training import config as train_config


class Interrupted(Exception):
    """Ctrl-C during a command: the message says what it left written."""


# What an interrupted command leaves (a command that knows more raises Interrupted).
INTERRUPTED = {
    "segment-dataset": "the sequences completed are kept in the output; run the same command "
                       "again to resume",
    "train": "the checkpoint saved last, if any, is kept; run the same command again to "
             "resume",
    "interactive-eval": "nothing is written until the end; run it again",
}


class UsageError(Exception):
    """A problem with the user's input: printed without a traceback, exit code 2."""


# Exceptions that are the user's problem (bad input files and options, unwritable outputs):
# ValueError covers CheckpointError, ScribbleError, FrameReadError and JSON errors, OSError
# covers missing, unreadable and unwritable paths.
USER_ERRORS = (UsageError, ValueError, OSError, ImportError)


class _HelpFormatter(argparse.HelpFormatter):
    """Help with each option's default shown, where it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or \
                default == argparse.SUPPRESS or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".strip()


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit code 2, and whose
    help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # "argument --mem-every: must be at least 1" (a _count check) reads better without
        # argparse's prefix: "--mem-every must be at least 1"
        message = re.sub(r"^argument (\S+): must be", r"\1 must be", message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(minimum):
    """argparse type: an int of at least `minimum`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}; got {value}")
        return value
    parse.__name__ = "count"
    return parse


def _port(text):
    """argparse type: a TCP port number, 0..65535 (0: any free one)."""
    value = _count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number, 0..65535; got {value}")
    return value


def _positive_float(text):
    """argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text}")
    return value


def resolve_runtime(runtime):
    """--runtime's value: auto is torch where PyTorch is installed, else onnxruntime;
    UsageError for torch where it is not."""
    if runtime == "auto":
        return "torch" if torch_available() else "onnxruntime"
    if runtime == "torch" and not torch_available():
        raise UsageError(f"--runtime torch {TORCH_MISSING}")
    return runtime


def _version_line():
    """`stm --version`: this package's version and the runtime it has (torch's version, or
    onnxruntime's where PyTorch is not installed)."""
    for name in ("torch", "onnxruntime"):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if name == "torch" and torch_available():
            return f"stm-kernels {__version__} (torch {version})"
        if name == "onnxruntime":
            return f"stm-kernels {__version__} (no PyTorch; onnxruntime {version})"
    return f"stm-kernels {__version__} (neither PyTorch nor onnxruntime is installed)"


def main(argv=None):
    """The `stm` command; returns the exit code (2 for a user error, printed as one line)."""
    parser = _Parser(prog="stm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=_version_line())
    commands = parser.add_subparsers(dest="command", required=True)
    _segment_parser(commands.add_parser(
        "segment", help="segment a video from a mask",
        description="Segment every frame of a video (a folder of JPEG/PNG frames or a video "
                    "file) from a mask: of its first frame (--mask), or the first of a folder "
                    "of masks on any frames (--masks); writes palette PNG masks named "
                    "like the input frames and an overlay. Given a DAVIS-format root, "
                    "segments every sequence (as segment-dataset)."))
    _dataset_parser(commands.add_parser(
        "segment-dataset", help="segment every sequence of a DAVIS-format root",
        description="Segment every sequence of a DAVIS-format root (JPEGImages/<res>/<seq>, "
                    "Annotations/<res>/<seq>), --batch-size sequences at a time, into "
                    "OUTPUT/<seq>/<frame>.png. Resumable: complete sequences in OUTPUT are "
                    "skipped, an interrupted one is redone. Under torchrun the sequences are "
                    "split over the ranks (one GPU each, or CPU processes)."))
    _eval_parser(commands.add_parser(
        "eval", help="J&F of a results folder against annotations",
        description="DAVIS J&F (semi-supervised protocol: first and last frame excluded) of "
                    "result masks against annotations; prints a table, writes the two CSVs."))
    _interactive_parser(commands.add_parser(
        "interactive-eval", help="robot-user interactive evaluation (AUC, J&F@60s)",
        description="Interactive segmentation of DAVIS-format sequences with a robot user: up "
                    "to --rounds rounds of scribbles on the worst frame, J&F after each round, "
                    "the AUC of J&F against time and J&F@60s; writes a JSON file and a plot."))
    _interactive_scribbles_parser(commands.add_parser(
        "interactive", help="segment a video from your own scribbles (DAVIS scribble files)",
        description="Interactive segmentation from the command line: each --scribbles file "
                    "(the DAVIS interactive format, strokes on any frames) is one round of "
                    "InteractiveSession; writes palette PNG masks named like the frames and "
                    "an overlay after the last round."))
    _annotate_parser(commands.add_parser(
        "annotate", help="segment a video interactively in a browser (a local web page)",
        description="Start a local web server for one video and print the URL of its page: "
                    "scribble on frames, run rounds of interactive segmentation, correct, "
                    "export DAVIS palette masks, the scribbles and an overlay. The rounds are "
                    "saved in the output folder: the same command continues them."))
    export = commands.add_parser(
        "export", help="rewrite a checkpoint as weights only (optionally fp16), or as ONNX "
                       "graphs",
        description="Write the model of a checkpoint (a shipped model's name, an stm-kernels "
                    "run's checkpoint.pt or model.pt, or the official STM_weights.pth) as an "
                    "stm-kernels weights file, without optimiser state (--dtype fp16 halves "
                    "its size), or as a folder of ONNX graphs that onnxruntime runs without "
                    "PyTorch (--format onnx; docs/deploy.md).")
    export.add_argument("source", help="a checkpoint: small-real, official, ... (as "
                                       "--checkpoint), an stm-kernels run's checkpoint.pt or "
                                       "model.pt, or the official STM_weights.pth")
    export.add_argument("target", help="the weights file to write, or the folder of ONNX "
                                       "graphs")
    export.add_argument("--format", choices=("auto", "weights", "onnx"), default="auto",
                        help="weights (a .pt file) or onnx (a folder); default: onnx when "
                             "TARGET does not end in .pt or .pth")
    export.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32",
                        help="dtype of the stored weights (fp16 halves the file; ONNX graphs "
                             "are float32)")
    export.add_argument("--memory-dtype", choices=("fp32", "int8"), default="fp32",
                        help="the memory the ONNX read graphs take: int8 keys and values with "
                             "float32 scales, dequantised in the graph (about a quarter of "
                             "float32's bytes; docs/deploy.md)")
    export.set_defaults(run=_command("stm_model.commands.export", "export"))
    train_config.add_arguments(commands.add_parser(
        "train", help="train an STM (options: stm train --help)",
        description=train_config.DESCRIPTION)).set_defaults(
            run=_command("stm_model.training.loop", "run"))
    selftest_options.add_arguments(commands.add_parser(
        "selftest", help="check the fused read on this machine (results and speed)",
        description=selftest_options.DESCRIPTION)).set_defaults(
            run=_command("stm_kernels.selftest", "run_arguments"))
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named by the command's own parser, so the hint is its --help
            commands.choices[args.command].error(
                f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit_:  # --help (0), or a usage error (2) printed by _Parser.error
        return exit_.code
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:  # the reader of stdout left (`stm eval ... | head`): not an error
        _silence_stdout()
        return 0
    except (Interrupted, KeyboardInterrupt) as error:  # Ctrl-C: one line, exit code 130
        _end_progress_bars()
        said = str(error) if isinstance(error, Interrupted) else INTERRUPTED.get(
            args.command, "every file written is complete")
        print(f"stm {args.command}: interrupted: {said}", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        _end_progress_bars()
        message = re.sub(r"\s*\n\s*", " ", str(error)).strip() or type(error).__name__
        print(f"stm {args.command}: error: {message}", file=sys.stderr)
        return 2


def _command(module, function, needs_torch=True):
    """The `run` of a sub-command: module.function(args), the module imported when the command
    runs (not when the parsers are built); needs_torch: without PyTorch the command is refused
    in one line, before its module is imported."""
    def run(args):
        if needs_torch and not torch_available():
            raise UsageError(f"this command {TORCH_MISSING}")
        return getattr(importlib.import_module(module), function)(args)
    run.__qualname__ = f"{module}.{function}"
    return run


def _silence_stdout():
    """Point stdout at /dev/null once its reader has gone, so that the interpreter's final
    flush does not fail again (Python's documented handling of SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (captured, closed)
        pass


def _end_progress_bars():
    """Close the progress bars a failed command left open, so that its one line starts a line
    of its own (not the end of a bar's)."""
    tqdm = sys.modules.get("tqdm")  # no bar is open unless a command imported tqdm
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _segment_parser(parser):
    parser.add_argument("input", help="folder of frames (JPEG/PNG) or a video file")
    masks = parser.add_mutually_exclusive_group()
    masks.add_argument("--mask", help="mask of the first frame (palette or DAVIS-2016 PNG)")
    masks.add_argument("--masks", help="folder of masks named like the frames (segmenting "
                                       "starts at the first frame with a mask; later ones add "
                                       "objects)")
    parser.add_argument("--output", help="output folder (default: stm_output/<input name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the masks and overlay of an earlier run in --output "
                             "(they are removed first; without it such a folder is refused)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in --output: the masks it wrote are "
                             "checked and kept, the memory is rebuilt from them, the frames "
                             "after them are segmented (the options must be that run's)")
    parser.add_argument("--batch-size", type=_count(1), default=4,
                        help="with a DAVIS-format root: sequences segmented together")
    _model_arguments(parser, device_help="auto, cpu, cuda or cuda:N")
    _segmenter_arguments(parser, one_video=True)
    parser.add_argument("--max-objects", type=_count(1), default=DEFAULT_MAX_OBJECTS,
                        help="refuse masks with more object ids than this (default "
                             f"{DEFAULT_MAX_OBJECTS}; often a colour image read as ids)")
    _overlay_argument(parser)
    parser.add_argument("--fps", type=_positive_float,
                        help="overlay frame rate (default: the video's, else 24)")
    parser.add_argument("--max-frames", type=_count(1),
                        help="stop after this many frames (of the forward pass)")
    parser.add_argument("--both-directions", action="store_true",
                        help="when the first mask is on a later frame t: also segment frames "
                             "t-1..0 backwards, from a memory seeded with frame t")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto",
                        help="torch, or onnxruntime: the model's ONNX graphs (--checkpoint an "
                             "`stm export ... --format onnx` folder, or any model, exported "
                             "once into the user cache; docs/deploy.md); default: torch where "
                             "PyTorch is installed, else onnxruntime")
    parser.add_argument("--onnx-read", choices=("chunk", "whole"),
                        help="with --runtime onnxruntime: the memory read in chunks of bounded "
                             "memory (default) or as one graph (the Attention operator)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    # the runtime decides whether it needs torch (stm_model.commands.segment)
    parser.set_defaults(run=_command("stm_model.commands.segment", "segment", needs_torch=False))


def _model_arguments(parser, device_help):
    """--checkpoint, --random-weights, --config, --device: the model a segmenting command
    runs, and where."""
    parser.add_argument("--checkpoint", help="the model: small-real (the small STM shipped "
                                             "with the package, trained on real video; the "
                                             "default), official (the authors' released "
                                             "weights, downloaded once into the user cache), "
                                             "small (trained on synthetic video only), "
                                             "small-interactive, small-real-interactive, or a "
                                             "file: STM_weights.pth "
                                             "or an stm-kernels checkpoint")
    parser.add_argument("--random-weights", action="store_true",
                        help="an untrained network of --config instead (for training "
                             "experiments: its masks are meaningless)")
    parser.add_argument("--config", choices=["official", "small"],
                        help="with --random-weights: the network's size (default: official)")
    parser.add_argument("--device", default="auto", help=device_help)


def _segmenter_arguments(parser, one_video):
    """The segmenter's options (SegmenterOptions' fields with a flag; one_video=False: those
    BatchSegmenter takes), each under its field's name."""
    for field in options_module.cli_fields():
        if not field.metadata["one_video"] or one_video:
            _option_argument(parser, field.name)


def _option_argument(parser, name):
    """The flag of SegmenterOptions' field `name`, under the field's name."""
    field = next(field for field in options_module.cli_fields() if field.name == name)
    flag = field.metadata["flag"]
    if flag.switch:
        parser.add_argument(flag.name, dest=field.name, action="store_true", help=flag.help)
        return
    kind = dict(type=_count(flag.minimum)) if flag.minimum is not None else {}
    default = field.default if flag.default is None else flag.default
    parser.add_argument(flag.name, dest=field.name, default=default,
                        choices=flag.choices, metavar=flag.metavar, help=flag.help, **kind)


def _interactive_memory_dtype_argument(parser):
    """--memory-dtype of the interactive commands: SegmenterOptions' choices, the model's dtype
    by default (an InteractiveSession's)."""
    parser.add_argument("--memory-dtype", dest="memory_dtype",
                        choices=options_module.MEMORY_DTYPES,
                        help="storage dtype of the memory (default: the model's); int8 or fp8: "
                             "8 bits with scales, about half of bf16's bytes")


def _overlay_argument(parser):
    parser.add_argument("--overlay", choices=["mp4", "gif", "png", "none"], default="mp4",
                        help="the masks over the frames: a video, a GIF, a folder of PNGs, or "
                             "none")


def _interactive_checkpoint_argument(parser):
    parser.add_argument("--checkpoint", help="an interactive STM: small-real-interactive "
                                             "(shipped with the package, trained on real "
                                             "video; the default), small-interactive (trained "
                                             "on synthetic video), a checkpoint file, or official "
                                             "(the authors' semi-supervised weights, "
                                             "downloaded once; its scribble channels are "
                                             "untrained)")


def _dataset_parser(parser):
    parser.add_argument("root", help="DAVIS-format root (JPEGImages/<res>/<seq>/*.jpg, "
                                     "Annotations/<res>/<seq>/*.png)")
    parser.add_argument("--output", required=True, help="output folder: OUTPUT/<seq>/<frame>.png")
    parser.add_argument("--resolution", default="480p",
                        help="the DAVIS resolution folder (JPEGImages/<resolution>)")
    parser.add_argument("--sequences", nargs="+", help="only these sequences")
    parser.add_argument("--masks", choices=MASK_POLICIES, default="first",
                        help="first: the first frame's annotation only (DAVIS protocol); all: "
                             "every annotation PNG is an input (objects entering later)")
    parser.add_argument("--batch-size", type=_count(1), default=4,
                        help="sequences segmented together (one network batch)")
    _option_argument(parser, "max_internal_size")  # --size PIXELS, as in stm segment
    _model_arguments(parser, device_help="auto, cpu, cuda or cuda:N (under torchrun: "
                                         "cuda:LOCAL_RANK)")
    _segmenter_arguments(parser, one_video=False)
    parser.add_argument("--max-objects", type=_count(1), default=DEFAULT_MAX_OBJECTS,
                        help="refuse a sequence whose masks give more object ids than this "
                             f"(default {DEFAULT_MAX_OBJECTS})")
    parser.add_argument("--workers", type=_count(0), default=4,
                        help="threads decoding frames and writing masks")
    parser.add_argument("--eval", action="store_true",
                        help="then score the whole output with `stm eval`")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_command("stm_model.commands.dataset", "segment_dataset"))
    return parser


def _interactive_parser(parser):
    parser.add_argument("root", help="DAVIS-format root (JPEGImages/<res>/<seq>, "
                                     "Annotations/<res>/<seq> on every frame, optional "
                                     "Scribbles/<seq>/001.json for the first round)")
    parser.add_argument("--sequences", nargs="+", help="evaluate these sequences only")
    _interactive_checkpoint_argument(parser)
    parser.add_argument("--resolution", default="480p",
                        help="the DAVIS resolution folder (JPEGImages/<resolution>)")
    _option_argument(parser, "max_internal_size")  # --size PIXELS, as in stm segment
    parser.add_argument("--rounds", type=_count(1), default=8,
                        help="rounds of robot scribbles per sequence")
    parser.add_argument("--max-time", type=_positive_float, default=240.0,
                        help="AUC time range, seconds per object (default 8 x 30)")
    parser.add_argument("--at-time", type=_positive_float, default=60.0,
                        help="J&F@ this many seconds")
    parser.add_argument("--batch-size", type=_count(1), default=8, help="frames per fused read")
    parser.add_argument("--line-width", type=_count(1), default=3,
                        help="scribble width in pixels (at most the frames' smaller side)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=options_module.AMP_DTYPES,
                        help="autocast the network in this dtype (default: none; auto: bf16 on "
                             "a CPU with bf16 dot products, as stm segment's default)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="memory read implementation (default: auto)")
    _interactive_memory_dtype_argument(parser)
    parser.add_argument("--output", default="interactive_eval_output",
                        help="folder for interactive_eval.json and the plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_command("stm_model.commands.interactive", "interactive_evaluate"))


def _annotate_parser(parser):
    parser.add_argument("input", help="folder of frames (JPEG/PNG) or a video file")
    _interactive_checkpoint_argument(parser)
    parser.add_argument("--output", help="folder for the exported masks, scribbles and overlay, "
                                         "and the saved session (default: stm_output/<input "
                                         "name>)")
    parser.add_argument("--port", type=_port, default=8765,
                        help="port of the page (0: any free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on: 127.0.0.1 keeps the page to this "
                             "machine; another makes the video and the output folder "
                             "reachable by anyone who reaches the port")
    parser.add_argument("--size", "--max-internal-size", type=_count(16),
                        dest="max_internal_size", metavar="PIXELS",
                        help="segment frames resized so that their shorter side is at most "
                             "PIXELS (masks are exported at the frames' size)")
    parser.add_argument("--objects", type=_count(1), default=1,
                        help="objects at the start (the page adds more)")
    parser.add_argument("--restart", action="store_true",
                        help="forget the session saved in --output and start a new one")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _interactive_memory_dtype_argument(parser)
    parser.set_defaults(run=_command("stm_model.commands.annotate", "annotate"))


def _interactive_scribbles_parser(parser):
    parser.add_argument("input", help="folder of frames (JPEG/PNG) or a video file")
    parser.add_argument("--scribbles", nargs="+", required=True, metavar="FILE.json",
                        help="scribble files in the DAVIS interactive format, one per round, "
                             "in order")
    _interactive_checkpoint_argument(parser)
    parser.add_argument("--output", help="output folder (default: stm_output/<input name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the masks and overlay of an earlier run in --output")
    parser.add_argument("--objects", type=_count(1),
                        help="the number of objects; ids above it are refused, an object "
                             "without a scribble gets no pixels (default: the scribbles' ids, "
                             "which must then be 1..n, each drawn)")
    _option_argument(parser, "max_internal_size")  # --size PIXELS, as stm segment's
    parser.add_argument("--line-width", type=_count(1), default=3,
                        help="scribble width in pixels")
    _overlay_argument(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _interactive_memory_dtype_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_command("stm_model.commands.interactive", "interactive"))


def _eval_parser(parser):
    parser.add_argument("results", help="result masks: <results>/<sequence>/<frame>.png, or "
                                        "one sequence's folder")
    parser.add_argument("annotations", help="ground truth, laid out like the results")
    parser.add_argument("--sequences", nargs="+", help="evaluate these sequences only")
    parser.add_argument("--output", help="folder for the CSV files (default: the results "
                                         "folder)")
    parser.add_argument("--davis2016", action="store_true",
                        help="DAVIS-2016 (single object): any object is foreground, in the "
                             "results and the annotations")
    parser.set_defaults(run=_command("stm_model.commands.evaluate", "evaluate",
                                     needs_torch=False))


if __name__ == "__main__":
    sys.exit(main())
