"""`stm interactive-eval` (a robot user's rounds on DAVIS sequences) and `stm interactive`
(rounds from the user's own scribble files)."""
import json
import pathlib
import sys

import numpy as np
import torch
from PIL import Image

from stm_model import io as video_io
from stm_model.cli import UsageError
from stm_model.commands.common import (DEFAULT_INTERACTIVE_CHECKPOINT, check_output,
                                       claim_output, clear_output, overlay_writer, write_mask)
from stm_model.commands.models import device_named, load_model, warn_if_autocast_on_cpu
from stm_model.interactive import robot as interactive_eval
from stm_model.inference.resize import internal_size
from stm_model.interactive import scribbles as scribble_format


def interactive_evaluate(args):
    """`stm interactive-eval`: robot rounds per sequence, a table, JSON and a plot; --output
    is held for the whole run (claim_output), so that its JSON and plot are one run's."""
    with claim_output(pathlib.Path(args.output), "stm interactive-eval"):
        return _interactive_evaluate(args)


def _interactive_evaluate(args):
    device = device_named(args.device)
    warn_if_autocast_on_cpu(args.amp, device)
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1; got {args.rounds}")
    _check_interactive_inputs(args)
    model = load_model(args.checkpoint or DEFAULT_INTERACTIVE_CHECKPOINT, device)
    results = interactive_eval.evaluate_davis(
        model, args.root, args.sequences, resolution=args.resolution,
        rounds=args.rounds, max_time=args.max_time, at_time=args.at_time,
        show_progress=not args.quiet, batch_size=args.batch_size, line_width=args.line_width,
        amp_dtype=args.amp, read_backend=args.backend, memory_dtype=args.memory_dtype,
        max_internal_size=args.max_internal_size)
    print(interactive_eval.format_report(results))
    output = pathlib.Path(args.output)
    path = interactive_eval.write_results(
        results, output / "interactive_eval.json", device=str(device),
        torch=torch.__version__, checkpoint=args.checkpoint or DEFAULT_INTERACTIVE_CHECKPOINT,
        max_internal_size=args.max_internal_size, rounds=args.rounds,
        batch_size=args.batch_size,
        line_width=args.line_width, amp=args.amp, backend=args.backend,
        memory_dtype=args.memory_dtype)
    print(f"wrote {path}")
    try:
        print(f"wrote {interactive_eval.plot_curves(results, output / 'interactive_curve.png')}")
    except ImportError:
        print('(no plot: matplotlib is not installed; pip install matplotlib, or pip install '
              '"/path/to/stm-kernels[bench]" from a clone)')
    return 0


def _check_interactive_inputs(args):
    """UsageError, before any model is built, for a --line-width wider than a sequence's
    frames (at --size when given: the size the session works at) and for a first-round scribble file
    (Scribbles/<sequence>/001.json) that is not JSON or not DAVIS scribbles for its sequence
    (frame count, object ids): the message names the file."""
    root = pathlib.Path(args.root)
    annotations = root / "Annotations" / args.resolution
    names = args.sequences or sorted(p.name for p in annotations.iterdir() if p.is_dir())
    for name in names:
        frames = video_io.list_frames(root / "JPEGImages" / args.resolution / name)
        with Image.open(frames[0]) as image:  # the size the session works at
            height, width = internal_size((image.height, image.width), args.max_internal_size)
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


def _object_count(args, rounds):
    """The session's object count: --objects (no scribble's id above it), else the scribbles'
    ids, which must then be 1..n, each drawn (a gap is a typo more often than an empty
    object, and every id costs a channel of work); UsageError naming the id and the file."""
    used = {}
    for path, scribbles in zip(args.scribbles, rounds, strict=True):
        for object_id in scribble_format.object_ids(scribbles):
            if object_id > 0:  # 0: the background's strokes
                used.setdefault(object_id, path)
    if not used:
        raise UsageError("the scribbles name no object (object_id 1 or more)")
    if args.objects is not None:
        above = sorted(i for i in used if i > args.objects)
        if above:
            raise UsageError(f"object {above[0]} in {used[above[0]]} is above --objects "
                             f"{args.objects}")
        return args.objects
    missing = sorted(set(range(1, max(used) + 1)) - set(used))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise UsageError(f"the scribbles draw objects {', '.join(map(str, sorted(used)))} but "
                         f"not {shown} (object {max(used)} in {used[max(used)]}); give "
                         f"--objects {max(used)} to keep the empty ones, or fix the ids")
    return max(used)


def interactive(args):
    """`stm interactive`: rounds of InteractiveSession from scribble files, then masks and an
    overlay. Every input (frames, scribble files, model) is checked before the first round.
    The output folder is held from the start (claim_output): a second run into it is refused
    at once, not after its rounds."""
    source = pathlib.Path(args.input)
    output = pathlib.Path(args.output or pathlib.Path("stm_output") / source.stem)
    with claim_output(output, "stm interactive"):
        return _interactive(args, source, output)


def _interactive(args, source, output):
    """interactive's rounds and outputs, holding output's lock."""
    from stm_model.interactive.session import InteractiveSession
    device = device_named(args.device)
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
    num_objects = _object_count(args, rounds)
    check_output(output, args.overwrite)
    model = load_model(args.checkpoint or DEFAULT_INTERACTIVE_CHECKPOINT, device)
    session = InteractiveSession(model, torch.stack([frame.tensor for frame in frames]),
                                 num_objects, line_width=args.line_width,
                                 max_internal_size=args.max_internal_size,
                                 memory_dtype=args.memory_dtype,
                                 show_progress=not args.quiet, sequence=source.name)
    for index, scribbles in enumerate(rounds):
        labels = session.interact(scribbles)
        if not args.quiet:
            print(f"round {index + 1}: frames {scribble_format.annotated_frames(scribbles)} "
                  f"annotated, {session.rounds[-1].seconds:.1f} s", file=sys.stderr)
    clear_output(output)
    writer = overlay_writer(args, output, reader.fps or 24.0)
    try:
        for frame, mask in zip(frames, labels.numpy().astype(np.uint8), strict=True):
            write_mask(output, frame.name, mask)
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
