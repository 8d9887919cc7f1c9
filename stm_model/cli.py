"""The `stm` command line: segment a video with STM, evaluate results with DAVIS J&F.

    stm segment FRAMES_DIR_OR_VIDEO --mask FIRST_MASK.png --checkpoint STM_weights.pth
    stm segment video.mp4 --masks MASKS_DIR --output out/ --mem-every 5 --memory-dtype fp16
    stm segment-dataset DAVIS_ROOT --output out/ --batch-size 8 --eval   # every sequence
    torchrun --nproc_per_node 2 -m stm_model segment-dataset DAVIS_ROOT --output out/
    stm eval RESULTS_DIR ANNOTATIONS_DIR
    stm interactive-eval DAVIS_ROOT --sequences bear --rounds 8 --size 240 427
    stm train --output runs/small --steps 3000

User errors (bad options, unreadable or ambiguous inputs, unwritable outputs) are reported as
one line, `stm <command>: error: <message>`, with exit code 2; never a traceback.
"""
import argparse
import json
import pathlib
import re
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from stm_kernels import __version__, selftest
from stm_kernels.options import BACKENDS, DTYPES

from stm_model import metrics
from stm_model.runtime import cpu_allocator
from stm_model.inference import dataset_runs as dataset_segmentation
from stm_model.runtime import distributed
from stm_model.interactive import robot as interactive_eval
from stm_model.training import loop as train
from stm_model import io as video_io
from stm_model.interactive import scribbles as scribble_format
from stm_model.inference.batch_segmenter import BatchSegmenter
from stm_model.inference.directions import FrameSequence, segment_both_directions, segment_forward
from stm_model.network.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from stm_model.runtime.devices import autocast_is_slow, peak_memory_bytes, resolve_device
from stm_model.io.files import can_write_into
from stm_model.inference import options as options_module
from stm_model.inference.masks import (DEFAULT_MAX_OBJECTS, check_first_mask, check_object_count,
                                       object_ids)
from stm_model.network.stm import STM, STMConfig
from stm_model.inference.video_segmenter import VideoSegmenter


class Interrupted(Exception):
    """Ctrl-C during a command: the message says what it left written."""


# What an interrupted command leaves (a command that knows more raises Interrupted).
INTERRUPTED = {
    "segment-dataset": "the sequences completed are kept in the output; run the same command "
                       "again to resume",
    "train": "the last checkpoint is kept; run the same command again to resume",
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


def _positive_float(text):
    """argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text}")
    return value


def main(argv=None):
    """The `stm` command; returns the exit code (2 for a user error, printed as one line)."""
    parser = _Parser(prog="stm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version",
                        version=f"stm-kernels {__version__} (torch {torch.__version__})")
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
    export = commands.add_parser(
        "export", help="rewrite a checkpoint as weights only (optionally fp16)",
        description="Write the model of a checkpoint (an stm-kernels run's checkpoint.pt or "
                    "model.pt, or the official STM_weights.pth) as an stm-kernels weights "
                    "file, without optimiser state; --dtype fp16 halves its size.")
    export.add_argument("source", help="a checkpoint: an stm-kernels run's checkpoint.pt or "
                                       "model.pt, or the official STM_weights.pth")
    export.add_argument("target", help="the weights file to write")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of the stored weights (fp16 halves the file)")
    export.set_defaults(run=export_weights)
    train_parser = commands.add_parser(
        "train", help="train an STM (options: stm train --help)",
        description=train.__doc__.split("\n\n")[0])
    train.add_arguments(train_parser).set_defaults(run=train.run)
    selftest.add_arguments(commands.add_parser(
        "selftest", help="check the fused read on this machine (results and speed)",
        description=selftest.__doc__.split("\n\n")[0])).set_defaults(
            run=selftest.run_arguments)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0), or a usage error (2) printed by _Parser.error
        return exit_.code
    try:
        return args.run(args)
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


def _end_progress_bars():
    """Close the progress bars a failed command left open, so that its one line starts a line
    of its own (not the end of a bar's)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# --------------------------------------------------------------------------- segment


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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=segment)


def _model_arguments(parser, device_help):
    """--checkpoint, --random-weights, --config, --device: the model a segmenting command
    runs, and where."""
    parser.add_argument("--checkpoint", help="the model: small (the trained small STM shipped "
                                             "with the package; the default), "
                                             "small-interactive, the official "
                                             "STM_weights.pth or an stm-kernels checkpoint")
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
    parser.add_argument(flag.name, dest=field.name, default=field.default,
                        choices=flag.choices, metavar=flag.metavar, help=flag.help, **kind)


def _segmenter_options(args):
    """SegmenterOptions of the flags parsed by _segmenter_arguments."""
    fields = options_module.cli_fields()
    return options_module.SegmenterOptions(**{field.name: getattr(args, field.name)
                                              for field in fields if hasattr(args, field.name)})


def _device(name):
    """The torch device named by --device, or UsageError (devices.resolve_device)."""
    try:
        return resolve_device(name)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _warn_if_autocast_on_cpu(amp, device):
    """--amp where the CPU has no native instructions for it (autocast_is_slow): say so once,
    before the work."""
    if amp and autocast_is_slow(device, amp):
        print(f"warning: --amp {amp} on this CPU is many times slower than float32 (it has no "
              f"native {amp} matrix instructions); drop --amp here", file=sys.stderr)


def _checkpoint_path(name):
    """The file of a --checkpoint value (a shipped model's name or a path), or UsageError."""
    try:
        return resolve_checkpoint(name)
    except FileNotFoundError as error:
        raise UsageError(f"--checkpoint: {error}") from None


def _model(args, device):
    _warn_if_autocast_on_cpu(getattr(args, "amp_dtype", None), device)
    if not args.random_weights:
        return load_checkpoint(_checkpoint_path(args.checkpoint or "small"), device)
    print("warning: --random-weights: an untrained network, for training experiments; its "
          "masks are meaningless (drop it to segment with the trained small model)",
          file=sys.stderr)
    config = STMConfig() if args.config in (None, "official") else STMConfig.small()
    return STM(config).to(device).eval()


def _check_model_arguments(args):
    """The model options' combinations, before any work."""
    if args.random_weights and args.checkpoint:
        raise UsageError("--random-weights and --checkpoint exclude each other")
    if args.config and not args.random_weights:
        raise UsageError("--config applies with --random-weights (a checkpoint holds its own "
                         "size)")
    if not args.random_weights:
        _checkpoint_path(args.checkpoint or "small")


def _mask_lookup(args, reader):
    """{frame name: mask path}, with the first frame's mask required."""
    if args.mask:
        return {None: pathlib.Path(args.mask)}  # None: the first frame, whatever its name
    if not pathlib.Path(args.masks).is_dir():
        raise UsageError(f"--masks {args.masks}: no such folder")
    if reader.names is not None:
        return video_io.masks_for_frames(reader.names, args.masks)
    return {path.stem: path for path in sorted(pathlib.Path(args.masks).glob("*.png"))}


def _mask_paths(args, frames, masks):
    """{frame index: mask path}: --mask is the first frame's; --masks may start on any frame
    (UsageError when none of its masks is named like a frame)."""
    if args.mask:
        if not pathlib.Path(masks[None]).is_file():
            raise UsageError(f"--mask {masks[None]}: no such file")
        return {0: masks[None]}
    position = {name: index for index, name in enumerate(frames.names)}
    paths = {position[name]: path for name, path in masks.items() if name in position}
    if not paths:
        raise UsageError(f"no mask in {args.masks} is named like a frame of {args.input} "
                         f"(frames {frames.names[0]!r} ... {frames.names[-1]!r})")
    return paths


def _check_all_masks(paths, hw, max_objects):
    """Every mask of a run, read once before the first frame: readable, the first with an
    object, each of its frame's size, and with at most max_objects ids in all (the message
    names the mask that brings the count over and the limit all the masks need)."""
    ids_by_mask = []
    for position, index in enumerate(sorted(paths)):
        mask = video_io.read_mask(paths[index])
        if position == 0:  # segmenting starts there
            check_first_mask(mask, [], name=paths[index])
        video_io.check_mask_size(mask, hw, mask_name=paths[index].name)
        ids_by_mask.append((paths[index], object_ids(mask)))
    every = set().union(*(ids for _, ids in ids_by_mask))
    seen = set()
    for path, ids in ids_by_mask:
        seen |= set(ids)
        check_object_count(seen, max_objects, name=path.name, needed=len(every))


def _is_davis_root(path):
    path = pathlib.Path(path)
    return (path / "JPEGImages").is_dir() and (path / "Annotations").is_dir()


OVERLAY_FILES = ("overlay.mp4", "overlay.gif")  # `stm segment`'s overlay outputs, besides
                                                # the folder overlay/ of PNGs


def _earlier_results(output):
    """Masks, overlay frames and overlay videos an earlier `stm segment` run left in output,
    and the J&F tables `stm eval` wrote beside them (they would score the old masks)."""
    frames = [path for folder in (output / "masks", output / "overlay") if folder.is_dir()
              for path in folder.iterdir() if path.suffix == ".png"]
    tables = [folder / name for folder in (output, output / "masks")
              for name in (metrics.GLOBAL_CSV, metrics.PER_OBJECT_CSV)
              if (folder / name).is_file()]
    return frames + tables + [output / name for name in OVERLAY_FILES
                              if (output / name).exists()]


def _check_output(output, overwrite):
    """Check, without creating it yet (a run that fails to start leaves no empty folder), that
    output can be a folder of results: not a file, writable (a read-only filesystem and
    missing permissions alike), and not holding an earlier run's masks or overlay frames
    (the runs would mix) unless overwrite."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder (it is made if needed)")
    if not can_write_into(output):
        raise UsageError(f"cannot write into the output folder {output} (read-only, or a "
                         "parent is a file); choose another --output")
    earlier = _earlier_results(output)
    if earlier and not overwrite:
        raise UsageError(f"{output} already holds the results of an earlier run ({len(earlier)} "
                         "masks, overlay and J&F files); pass --overwrite to replace them, or "
                         "choose another --output")


def _clear_output(output):
    """Remove an earlier run's masks, overlay frames and videos (there are some only with
    --overwrite: see _check_output) and the temporary files of writes a run was killed in,
    so that the new run's results are not mixed with older ones. Makes the folder."""
    output.mkdir(parents=True, exist_ok=True)
    for path in _earlier_results(output):
        path.unlink(missing_ok=True)
    for folder in (output, output / "masks", output / "overlay"):
        video_io.remove_temporary_files(folder)


def _overlay_argument(parser):
    parser.add_argument("--overlay", choices=["mp4", "gif", "png", "none"], default="mp4",
                        help="the masks over the frames: a video, a GIF, a folder of PNGs, or "
                             "none")


def _interactive_checkpoint_argument(parser):
    parser.add_argument("--checkpoint", help="an interactive STM: small-interactive (shipped "
                                             "with the package; the default) or a checkpoint "
                                             "file")


def _overlay_writer(args, output, fps):
    if args.overlay == "none":
        return None
    target = output / "overlay" if args.overlay == "png" else output / f"overlay.{args.overlay}"
    return video_io.OverlayWriter(target, fps=fps)


def segment(args):
    """`stm segment`: masks (and an overlay) for every frame; prints a summary. A DAVIS-format
    root is segmented whole, as `stm segment-dataset` does with its defaults.

    Inputs are checked (frames, first mask, model) before an earlier run's results are
    removed (--overwrite; without it an output holding them is refused). Each mask and
    overlay frame is written atomically, so an interrupted run leaves complete files only (an
    unfinished GIF or video is dropped)."""
    _check_model_arguments(args)
    if _is_davis_root(args.input):
        return _segment_davis_root(args)
    if (pathlib.Path(args.input) / "JPEGImages").is_dir():
        raise UsageError(f"{args.input} has JPEGImages/ but no Annotations/: a DAVIS-format "
                         "root needs both (or give a folder of frames with --mask/--masks)")
    if not (args.mask or args.masks):
        raise UsageError("one of --mask (the first frame's mask) or --masks (a folder of "
                         "masks) is required")
    device = _device(args.device)
    reader = video_io.FrameReader(args.input)
    if reader.paths is not None:
        video_io.check_complete(reader.paths)  # a truncated frame now, not when reached
    frames = FrameSequence(reader)  # random access: a folder's images, a video's ranges
    masks = _mask_lookup(args, reader)
    paths = _mask_paths(args, frames, masks)
    first = min(paths)  # segmenting starts on the first frame with a mask
    # before any work, not when reached (every frame has the first's size: FrameReader)
    _check_all_masks(paths, frames[first].hw, args.max_objects)
    source = pathlib.Path(args.input)
    output = pathlib.Path(args.output or pathlib.Path("stm_output") / source.stem)
    _check_output(output, args.overwrite)
    model = _model(args, device)
    seg = VideoSegmenter.from_options(model, _segmenter_options(args))
    if first > 0 and not args.both_directions:
        print(f"note: the first mask is on frame {frames.names[first]}; the frames before it "
              "are not segmented (--both-directions segments them backwards)", file=sys.stderr)
    _clear_output(output)  # only now: a run that fails to start leaves the old results
    writer = _overlay_writer(args, output, args.fps or reader.fps or 24.0)
    stop = len(frames) if args.max_frames is None else min(len(frames),
                                                           first + args.max_frames)
    hw = frames[first].hw

    def mask_for(index):  # read when a pass reaches the frame (checked: _check_all_masks)
        path = paths.get(index)
        if path is None:
            return None
        return torch.from_numpy(video_io.read_mask(path, expected_hw=hw))

    run = segment_both_directions if args.both_directions else segment_forward
    results = run(seg, frames, mask_for, first, stop)
    in_order = first == 0 or not args.both_directions  # else the overlay is written after
    total = stop - first + (first if args.both_directions else 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, count = time.perf_counter(), 0
    objects = memory_frames = memory_bytes = 0  # the largest over both passes
    bar = tqdm(results, total=total, unit="frame", disable=args.quiet,
               desc=f"segmenting {source.name}")
    try:
        for result in bar:
            labels = result.labels.cpu().numpy()
            name = result.frame.name
            video_io.write_mask(output / "masks" / f"{name}.png", labels.astype(np.uint8))
            if writer is not None and in_order:
                writer.add(result.frame.image, labels, name=name)
            count += 1
            objects = max(objects, seg.num_objects)
            memory_frames = max(memory_frames, seg.memory_frames)
            memory_bytes = max(memory_bytes, seg.memory_bytes)
        if writer is not None and not in_order:  # in video order, from the masks written
            for frame in frames.range(0, stop):
                path = output / "masks" / f"{frame.name}.png"
                writer.add(frame.image, video_io.read_mask(path), name=frame.name)
    except BaseException as error:
        bar.close()
        if writer is not None:
            writer.abort()  # no truncated GIF or video; PNG frames are each complete
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"wrote {count} of {total} masks to {output / 'masks'}, each "
                              "complete (an unfinished overlay video or GIF is dropped); run "
                              "again with --overwrite to redo") from None
        raise
    bar.close()
    if writer is not None:
        writer.close()
    elapsed = time.perf_counter() - start
    summary = {
        "frames": count, "fps": count / elapsed if elapsed else float("nan"),
        "objects": objects, "memory frames": memory_frames,
        "memory bank MiB": memory_bytes / 2**20,
        "peak memory MiB": peak_memory_bytes(device) / 2**20, "device": str(device),
        "masks": str(output / "masks"), "overlay": str(writer.path) if writer else "none",
    }
    width = max(map(len, summary))
    for name, value in summary.items():
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{name:>{width}}: {text}")
    return 0


def _segment_davis_root(args):
    """`stm segment DAVIS_ROOT`: `stm segment-dataset` with the options both commands have."""
    if args.mask or args.masks:
        raise UsageError(f"{args.input} is a DAVIS-format root: its masks come from its "
                         "Annotations folder (drop --mask/--masks)")
    for field in options_module.one_video_fields():
        flag = field.metadata["flag"]
        if flag and getattr(args, field.name) != field.default:
            raise UsageError(f"{flag.name} applies to one video, not to a DAVIS-format root "
                             f"({field.metadata['one_video']})")
    if args.both_directions:
        raise UsageError("--both-directions applies to one video, not to a DAVIS-format root")
    if args.overwrite:
        raise UsageError("--overwrite does not apply to a DAVIS-format root: its segmentation "
                         "resumes, skipping the sequences already in the output; remove "
                         "OUTPUT/<sequence> to redo one")
    output = args.output or str(pathlib.Path("stm_output") / pathlib.Path(args.input).name)
    dataset_args = _dataset_parser(_Parser(prog="stm segment")).parse_args(
        [args.input, "--output", output])
    for name, value in vars(args).items():  # the options both commands have
        if name in vars(dataset_args) and name not in ("masks", "output", "run") and \
                value is not None:
            setattr(dataset_args, name, value)
    return segment_dataset(dataset_args)


# --------------------------------------------------------------------------- segment-dataset


def _dataset_parser(parser):
    parser.add_argument("root", help="DAVIS-format root (JPEGImages/<res>/<seq>/*.jpg, "
                                     "Annotations/<res>/<seq>/*.png)")
    parser.add_argument("--output", required=True, help="output folder: OUTPUT/<seq>/<frame>.png")
    parser.add_argument("--resolution", default="480p",
                        help="the DAVIS resolution folder (JPEGImages/<resolution>)")
    parser.add_argument("--sequences", nargs="+", help="only these sequences")
    parser.add_argument("--masks", choices=dataset_segmentation.MASK_POLICIES, default="first",
                        help="first: the first frame's annotation only (DAVIS protocol); all: "
                             "every annotation PNG is an input (objects entering later)")
    parser.add_argument("--batch-size", type=_count(1), default=4,
                        help="sequences segmented together (one network batch)")
    parser.add_argument("--size", type=_count(1), nargs=2, metavar=("H", "W"),
                        help="segment at this size (masks are written at the frames' size)")
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
    parser.set_defaults(run=segment_dataset)
    return parser


def _dataset_plan(args, world_size):
    """(shares: one list of Sequences per rank, names of complete sequences) or an error."""
    try:
        sequences = dataset_segmentation.list_sequences(
            args.root, args.resolution, args.sequences, args.masks)
    except (FileNotFoundError, ValueError) as error:
        return {"error": str(error)}
    todo, done = dataset_segmentation.split_complete(sequences, args.output)
    return {"shares": dataset_segmentation.balanced_split(todo, world_size),
            "complete": [s.name for s in done], "all": [s.name for s in sequences]}


def segment_dataset(args):
    """`stm segment-dataset`: every sequence, --batch-size at a time, split over torchrun's
    ranks; rank 0 prints the table, writes OUTPUT/segment_summary.json, optionally evaluates."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1; got {args.batch_size}")
    _check_model_arguments(args)
    _device(args.device)  # a clear error for an unknown or absent device
    context = distributed.setup(args.device)
    try:
        plan = distributed.broadcast(
            _dataset_plan(args, context.world_size) if context.is_main else None, context)
        if "error" in plan:
            raise UsageError(plan["error"])
        device = context.device
        if device.type == "cpu":
            cpu_allocator.keep_freed_memory()  # no page faults per step (see the module)
        if args.random_weights:
            torch.manual_seed(0)  # every rank builds the same untrained model
        model = _model(args, device)
        segmenter = BatchSegmenter.from_options(model, _segmenter_options(args))
        mine = plan["shares"][context.rank]
        if context.is_main and plan["complete"]:
            print(f"skipping {len(plan['complete'])} complete sequences in {args.output}",
                  file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        summaries = dataset_segmentation.segment_sequences(
            segmenter, mine, args.output, args.batch_size, size=args.size,
            workers=args.workers, show_progress=context.is_main and not args.quiet,
            rank=context.rank, max_objects=args.max_objects)
        info = dict(rank=context.rank, device=str(device),
                    seconds=time.perf_counter() - start,
                    peak_memory_bytes=peak_memory_bytes(device))
        gathered = distributed.gather((summaries, info), context)
    finally:
        distributed.teardown(context)
    if not context.is_main:
        return 0
    dataset_segmentation.remove_incomplete_folder(args.output)
    summaries = sorted((s for part, _ in gathered for s in part), key=lambda s: s["name"])
    ranks = [info for _, info in gathered]
    print(dataset_segmentation.format_report(summaries, ranks))
    print(f"{len(summaries)} sequences segmented, {len(plan['complete'])} already complete "
          f"(skipped); batch size {args.batch_size}, {context.world_size} process(es); masks "
          f"in {args.output}")
    _write_json(pathlib.Path(args.output) / "segment_summary.json", dict(
        sequences=summaries, skipped=plan["complete"], ranks=ranks,
        batch_size=args.batch_size, world_size=context.world_size, size=args.size,
        checkpoint=None if args.random_weights else (args.checkpoint or "small"),
        mem_every=args.mem_every, masks=args.masks))
    if args.eval:
        evaluate_results(args.output, pathlib.Path(args.root) / "Annotations" / args.resolution,
                         plan["all"])
    return 0


def _write_json(path, payload):
    """Write JSON atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    video_io.write_atomically(path, lambda file: file.write(
        json.dumps(payload, indent=1).encode()))


# --------------------------------------------------------------------------- interactive-eval


def _interactive_parser(parser):
    parser.add_argument("root", help="DAVIS-format root (JPEGImages/<res>/<seq>, "
                                     "Annotations/<res>/<seq> on every frame, optional "
                                     "Scribbles/<seq>/001.json for the first round)")
    parser.add_argument("--sequences", nargs="+", help="evaluate these sequences only")
    _interactive_checkpoint_argument(parser)
    parser.add_argument("--resolution", default="480p",
                        help="the DAVIS resolution folder (JPEGImages/<resolution>)")
    parser.add_argument("--size", type=_count(1), nargs=2, metavar=("H", "W"),
                        help="segment at this size (scores stay at the annotations' size)")
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
                        help="autocast the network")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="memory read implementation (default: auto)")
    parser.add_argument("--output", default="interactive_eval_output",
                        help="folder for interactive_eval.json and the plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=interactive_evaluate)


def interactive_evaluate(args):
    """`stm interactive-eval`: robot rounds per sequence, a table, JSON and a plot."""
    from stm_model.demo import load_small_model, SMALL_INTERACTIVE_WEIGHTS
    device = _device(args.device)
    _warn_if_autocast_on_cpu(args.amp, device)
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1; got {args.rounds}")
    _check_interactive_inputs(args)
    path = _checkpoint_path(args.checkpoint or "small-interactive")
    model = load_checkpoint(path, device) if args.checkpoint else load_small_model(path, device)
    results = interactive_eval.evaluate_davis(
        model, args.root, args.sequences, resolution=args.resolution, size=args.size,
        rounds=args.rounds, max_time=args.max_time, at_time=args.at_time,
        show_progress=not args.quiet, batch_size=args.batch_size, line_width=args.line_width,
        amp_dtype=args.amp, read_backend=args.backend)
    print(interactive_eval.format_report(results))
    output = pathlib.Path(args.output)
    path = interactive_eval.write_results(
        results, output / "interactive_eval.json", device=str(device),
        torch=torch.__version__, checkpoint=args.checkpoint or str(SMALL_INTERACTIVE_WEIGHTS),
        size=args.size, rounds=args.rounds, batch_size=args.batch_size,
        line_width=args.line_width, amp=args.amp, backend=args.backend)
    print(f"wrote {path}")
    try:
        print(f"wrote {interactive_eval.plot_curves(results, output / 'interactive_curve.png')}")
    except ImportError:
        print("(no plot: matplotlib is not installed; pip install stm-kernels[bench])")
    return 0


def _check_interactive_inputs(args):
    """UsageError, before any model is built, for a --line-width wider than a sequence's
    frames (at --size when given) and for a first-round scribble file
    (Scribbles/<sequence>/001.json) that is not JSON or not DAVIS scribbles for its sequence
    (frame count, object ids): the message names the file."""
    root = pathlib.Path(args.root)
    annotations = root / "Annotations" / args.resolution
    names = args.sequences or sorted(p.name for p in annotations.iterdir() if p.is_dir())
    for name in names:
        frames = video_io.list_frames(root / "JPEGImages" / args.resolution / name)
        if args.size:
            height, width = args.size
        else:
            with Image.open(frames[0]) as image:
                width, height = image.size
        if args.line_width > min(height, width):
            raise UsageError(f"--line-width {args.line_width} is wider than the {width}x{height} "
                             f"(WxH) frames of {name}")
        path = root / "Scribbles" / name / "001.json"
        if path.exists():
            _check_scribble_file(path, frames, annotations / name)


def _check_scribble_file(path, frames, annotations):
    """UsageError naming path unless it holds DAVIS scribbles for these frames, with object
    ids the annotations have."""
    try:
        scribbles = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"scribble file {path} is not JSON: {error}") from None
    num_objects = max((int(video_io.read_mask(annotations / f"{frame.stem}.png").max())
                       for frame in frames if (annotations / f"{frame.stem}.png").exists()),
                      default=None)
    try:
        scribble_format.check_scribbles(scribbles, len(frames), num_objects or None)
    except scribble_format.ScribbleError as error:
        raise UsageError(f"scribble file {path}: {error}") from None


# --------------------------------------------------------------------------- interactive


def _interactive_scribbles_parser(parser):
    parser.add_argument("input", help="folder of frames (JPEG/PNG) or a video file")
    parser.add_argument("--scribbles", nargs="+", required=True, metavar="FILE.json",
                        help="scribble files in the DAVIS interactive format, one per round, "
                             "in order")
    _interactive_checkpoint_argument(parser)
    parser.add_argument("--output", help="output folder (default: stm_output/<input name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the masks and overlay of an earlier run in --output")
    _option_argument(parser, "max_internal_size")  # --size PIXELS, as stm segment's
    parser.add_argument("--line-width", type=_count(1), default=3,
                        help="scribble width in pixels")
    _overlay_argument(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=interactive)


def interactive(args):
    """`stm interactive`: rounds of InteractiveSession from scribble files, then masks and an
    overlay. Every input (frames, scribble files, model) is checked before the first round."""
    from stm_model.interactive.session import InteractiveSession
    device = _device(args.device)
    reader = video_io.FrameReader(args.input)
    if reader.paths is not None:
        video_io.check_complete(reader.paths)
    frames = list(reader)
    rounds = []
    for path in map(pathlib.Path, args.scribbles):
        try:
            scribbles = json.loads(path.read_text())
            scribble_format.check_scribbles(scribbles, len(frames))
        except FileNotFoundError:
            raise UsageError(f"--scribbles {path}: no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError, scribble_format.ScribbleError) as error:
            raise UsageError(f"scribble file {path}: {error}") from None
        rounds.append(scribbles)
    num_objects = max(max(scribble_format.object_ids(r), default=0) for r in rounds)
    if num_objects < 1:
        raise UsageError("the scribbles name no object (object_id 1 or more)")
    source = pathlib.Path(args.input)
    output = pathlib.Path(args.output or pathlib.Path("stm_output") / source.stem)
    _check_output(output, args.overwrite)
    path = _checkpoint_path(args.checkpoint or "small-interactive")
    model = load_checkpoint(path, device)
    session = InteractiveSession(model, torch.stack([frame.tensor for frame in frames]),
                                 num_objects, line_width=args.line_width,
                                 max_internal_size=args.max_internal_size,
                                 show_progress=not args.quiet, sequence=source.name)
    for index, scribbles in enumerate(rounds):
        labels = session.interact(scribbles)
        if not args.quiet:
            print(f"round {index + 1}: frames {scribble_format.annotated_frames(scribbles)} "
                  f"annotated, {session.rounds[-1].seconds:.1f} s", file=sys.stderr)
    _clear_output(output)
    writer = _overlay_writer(args, output, reader.fps or 24.0)
    try:
        for frame, mask in zip(frames, labels.numpy().astype(np.uint8), strict=True):
            video_io.write_mask(output / "masks" / f"{frame.name}.png", mask)
            if writer is not None:
                writer.add(frame.image, mask, name=frame.name)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    print(f"{len(rounds)} rounds, {num_objects} objects; masks in {output / 'masks'}"
          + (f", overlay {writer.path}" if writer is not None else ""))
    return 0


# --------------------------------------------------------------------------- export


def export_weights(args):
    """`stm export`: weights-only checkpoint, in the requested dtype."""
    dtype = None if args.dtype == "fp32" else DTYPES[args.dtype]  # fp32: as stored
    save_checkpoint(load_checkpoint(args.source), args.target, weights_dtype=dtype)
    size = pathlib.Path(args.target).stat().st_size
    print(f"wrote {args.target} ({size / 2**20:.1f} MiB, {args.dtype})")
    return 0


# --------------------------------------------------------------------------- eval


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
    parser.set_defaults(run=evaluate)


def _sequences(results, annotations, only):
    """[(name, results folder, annotations folder)]."""
    if any(annotations.glob("*.png")):
        return [(annotations.name, results, annotations)]
    names = only or sorted(p.name for p in annotations.iterdir() if p.is_dir())
    if not names:
        raise UsageError(f"no annotation PNGs or sequence folders in {annotations}")
    missing = [name for name in names if not (results / name).is_dir()]
    if missing:
        raise UsageError(f"results lack sequences {missing} (looked in {results})")
    return [(name, results / name, annotations / name) for name in names]


def evaluate(args):
    """`stm eval`: per-object and global J&F, printed and written as the DAVIS CSV files."""
    return evaluate_results(args.results, args.annotations, args.sequences, args.output,
                            davis2016=args.davis2016)


def evaluate_results(results, annotations, sequences=None, output=None, davis2016=False):
    """J&F of result masks against annotations (see `stm eval`); prints the table and writes
    the two DAVIS CSVs to output (default: the results folder). davis2016: every object id
    counts as one foreground object (the DAVIS-2016 single-object protocol)."""
    results, annotations = pathlib.Path(results), pathlib.Path(annotations)
    for what, folder in (("results", results), ("annotations", annotations)):
        if not folder.is_dir():
            raise UsageError(f"the {what} folder {folder} does not exist")
    target = pathlib.Path(output or results)
    if not can_write_into(target):  # before the work, not after it
        hint = "choose another --output" if output else "pass --output DIR for the CSV files"
        raise UsageError(f"cannot write the CSV files into {target} (read-only or not a "
                         f"folder); {hint}")
    scored = {}
    for name, result_folder, annotation_folder in _sequences(results, annotations, sequences):
        truth_paths = sorted(annotation_folder.glob("*.png"))
        missing = [p.name for p in truth_paths if not (result_folder / p.name).exists()]
        if missing:
            raise UsageError(f"{name}: no result for {len(missing)} annotated frames "
                             f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        truth, void = zip(*(video_io.read_annotation(p) for p in truth_paths), strict=True)
        predicted = []
        for path, annotation in zip(truth_paths, truth, strict=True):
            result = video_io.read_mask(result_folder / path.name)
            if result.shape != annotation.shape:
                raise UsageError(f"{name}: result {path.name} is {result.shape[1]}x"
                                 f"{result.shape[0]} (WxH) but its annotation is "
                                 f"{annotation.shape[1]}x{annotation.shape[0]}; results must "
                                 "have the annotations' size")
            predicted.append(result)
        if davis2016:  # one object: the union of all of them
            truth = [(t > 0).astype(np.int64) for t in truth]
            predicted = [(p > 0).astype(np.int64) for p in predicted]
        try:
            scored[name] = metrics.evaluate_sequence(truth, predicted, void=void)  # void: out
        except ValueError as error:  # name the sequence and the frame's file
            names = [path.name for path in truth_paths]
            message = re.sub(r"frame (\d+)", lambda m, names=names: names[int(m.group(1))],
                             str(error), count=1)
            hint = "" if davis2016 else " (--davis2016 scores any object as the foreground)"
            raise UsageError(f"{name}: {message}{hint}") from None
    per_object, global_row = metrics.summarize(scored)
    print(metrics.format_table(per_object, global_row))
    paths = metrics.write_csvs(pathlib.Path(output or results), per_object, global_row)
    print("wrote " + " and ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
