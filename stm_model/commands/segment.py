"""`stm segment`: one video (a folder of frames or a video file) from its masks, or a
DAVIS-format root handed to `stm segment-dataset`.

Imports no torch: with --runtime onnxruntime the command runs where PyTorch is not installed
(the torch runtime's modules are imported when it is chosen)."""
import json
import pathlib
import resource
import sys
import time

import numpy as np
from tqdm import tqdm

from stm_model import io as video_io
from stm_model.cli import Interrupted, UsageError, _dataset_parser, _Parser, resolve_runtime
from stm_model.commands.common import (DEFAULT_CHECKPOINT, check_output, claim_output,
                                       clear_output, overlay_writer, segmenter_options,
                                       write_json, write_mask)
from stm_model.commands.onnx_runtime import check_onnx_arguments, onnx_segmenter
from stm_model.deploy.manifest import is_export_folder
from stm_model.inference import options as options_module
from stm_model.inference.directions import FrameSequence, segment_both_directions, segment_forward
from stm_model.inference.masks import check_first_mask, check_object_count, object_ids


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
    object, each of its frame's size (or within 1%: resized, with a note), and with at most
    max_objects ids in all (the message names the mask that brings the count over and the
    limit all the masks need). Returns the set of their ids."""
    ids_by_mask = []
    for position, index in enumerate(sorted(paths)):
        mask = video_io.read_mask(paths[index])
        if position == 0:  # segmenting starts there
            check_first_mask(mask, [], name=paths[index])
        mask, note = video_io.fit_mask_size(mask, hw, mask_name=paths[index].name)
        if note:
            print(f"note: {note}", file=sys.stderr)
        ids_by_mask.append((paths[index], object_ids(mask)))
    every = set().union(*(ids for _, ids in ids_by_mask))
    seen = set()
    for path, ids in ids_by_mask:
        seen |= set(ids)
        check_object_count(seen, max_objects, name=path.name, needed=len(every))
    return every


RUN_RECORD = "segment_run.json"  # what a run was made from, for --resume to compare


def _run_record(args, source):
    """What decides a run's masks: its inputs, model and segmenting options (a resumed run
    must have the same)."""
    resolved = [str(pathlib.Path(path).resolve()) if path else None
                for path in (source, args.mask, args.masks)]
    return dict(input=resolved[0], mask=resolved[1], masks=resolved[2],
                checkpoint=None if args.random_weights else str(_model_file(args).resolve()),
                options={field.name: getattr(args, field.name)
                         for field in options_module.cli_fields()},
                max_frames=args.max_frames, both_directions=args.both_directions)


def _model_file(args):
    """The file (or ONNX export folder) of the run's --checkpoint."""
    name = args.checkpoint or DEFAULT_CHECKPOINT
    if is_export_folder(name):
        return pathlib.Path(name)
    from stm_model.commands.models import checkpoint_path
    return checkpoint_path(name)


def _flag_of(field_name):
    """The command-line flag of a SegmenterOptions field (--size for max_internal_size)."""
    for field in options_module.cli_fields():
        if field.name == field_name and field.metadata.get("flag"):
            return field.metadata["flag"].name
    return field_name


def _resumable(args, output, record):
    """--resume: UsageError unless output holds a run made from `record` (or nothing yet)."""
    if args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other (--resume keeps the "
                         "masks written, --overwrite removes them)")
    if args.random_weights:
        raise UsageError("--resume needs a checkpoint: --random-weights differs per run")
    path = output / RUN_RECORD
    if not path.is_file():
        if any((output / "masks").glob("*.png")):
            raise UsageError(f"--resume: {output} holds masks but no record of the run that "
                             f"wrote them ({RUN_RECORD}); pass --overwrite to start again")
        return
    try:
        earlier = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"--resume: {path} is not JSON ({error}); pass --overwrite to start "
                         "again") from None
    options = earlier.get("options")
    if isinstance(options, dict) and "amp_dtype" in options and options["amp_dtype"] is None:
        options["amp_dtype"] = "fp32"  # --amp unset when unset meant no autocast: fp32's masks
    changed = []
    for key, value in record.items():
        if key == "options" and isinstance(earlier.get(key), dict):  # name the option itself
            changed += [f"{_flag_of(name)} {earlier[key].get(name)!r} then, {now!r} now"
                        for name, now in value.items() if earlier[key].get(name) != now]
        elif earlier.get(key) != value:
            changed.append(f"{key}: {earlier.get(key)!r} then, {value!r} now")
    if changed:
        raise UsageError(f"--resume: the run in {output} was made with other settings ("
                         f"{'; '.join(changed)}); give its options, or pass --overwrite to "
                         "start again")


def _written_masks(output, frames, indices, hw, ids):
    """{frame index: path} of the masks an interrupted run wrote for `indices`, each checked
    (complete, readable, of the frames' size, with ids the input masks have)."""
    found = {index: output / "masks" / f"{frames.names[index]}.png" for index in indices}
    found = {index: path for index, path in found.items() if path.is_file()}
    for path in found.values():
        try:
            video_io.check_complete([path])
            mask = video_io.read_mask(path)
            video_io.check_mask_size(mask, hw, mask_name=path.name)
        except ValueError as error:
            raise UsageError(f"--resume: {error}; remove {path} to have it segmented again"
                             ) from None
        unknown = sorted(set(object_ids(mask)) - set(ids))
        if unknown:
            raise UsageError(f"--resume: {path} holds object ids {unknown} that no input mask "
                             "has: not this run's; pass --overwrite to start again")
    return found


def _is_davis_root(path):
    path = pathlib.Path(path)
    return (path / "JPEGImages").is_dir() and (path / "Annotations").is_dir()


def segment(args):
    """`stm segment`: masks (and an overlay) for every frame; prints a summary. A DAVIS-format
    root is segmented whole, as `stm segment-dataset` does with its defaults.

    The output folder is held for the whole run (claim_output): a second run into it is
    refused at start. Inputs are checked (frames, first mask, model) before an earlier run's
    results are removed (--overwrite; without it an output holding them is refused). Each
    mask and overlay frame is written atomically, so an interrupted run leaves complete files
    only (an unfinished GIF or video is dropped)."""
    args.runtime = resolve_runtime(args.runtime)
    check_onnx_arguments(args)
    if args.runtime == "torch" or not is_export_folder(args.checkpoint or ""):
        from stm_model.commands.models import check_model_arguments
        check_model_arguments(args)
    if _is_davis_root(args.input):
        return _segment_davis_root(args)
    if (pathlib.Path(args.input) / "JPEGImages").is_dir():
        raise UsageError(f"{args.input} has JPEGImages/ but no Annotations/: a DAVIS-format "
                         "root needs both (or give a folder of frames with --mask/--masks)")
    if not (args.mask or args.masks):
        raise UsageError("one of --mask (the first frame's mask) or --masks (a folder of "
                         "masks) is required")
    source = pathlib.Path(args.input)
    output = pathlib.Path(args.output or pathlib.Path("stm_output") / source.stem)
    with claim_output(output, "stm segment"):  # for the whole run: one run per folder
        return _segment_video(args, source, output)


def _segment_video(args, source, output):
    """segment's one video into output, whose lock the caller holds."""
    device = None  # onnxruntime's CPU provider
    if args.runtime == "torch":
        from stm_model.commands.models import device_named
        device = device_named(args.device)
    reader = video_io.FrameReader(args.input)
    if reader.paths is not None:
        video_io.check_complete(reader.paths)  # a truncated frame now, not when reached
    frames = FrameSequence(reader)  # random access: a folder's images, a video's ranges
    masks = _mask_lookup(args, reader)
    paths = _mask_paths(args, frames, masks)
    first = min(paths)  # segmenting starts on the first frame with a mask
    # before any work, not when reached (every frame has the first's size: FrameReader)
    hw = frames[first].hw
    ids = _check_all_masks(paths, hw, args.max_objects)
    check_output(output, args.overwrite or args.resume, resumable=True)
    stop = len(frames) if args.max_frames is None else min(len(frames),
                                                           first + args.max_frames)
    indices = list(range(first, stop)) + (list(range(first)) if args.both_directions else [])
    record = _run_record(args, source)
    written = {}
    if args.resume:
        _resumable(args, output, record)
        written = _written_masks(output, frames, indices, hw, ids)
    if args.runtime == "onnxruntime":
        seg = onnx_segmenter(args, segmenter_options(args))
    else:
        from stm_model.commands.models import build_model
        from stm_model.inference.video_segmenter import VideoSegmenter
        if device.type == "cpu":
            from stm_model.runtime import cpu_allocator
            cpu_allocator.keep_freed_memory()  # a long video's resident set: see the module
        seg = VideoSegmenter.from_options(build_model(args, device),
                                          segmenter_options(args))
    if first > 0 and not args.both_directions:
        print(f"note: the first mask is on frame {frames.names[first]}; the frames before it "
              "are not segmented (--both-directions segments them backwards)", file=sys.stderr)
    clear_output(output, keep_masks=args.resume)  # only now: a run that fails to start
    write_json(output / RUN_RECORD, record)         # leaves the old results
    writer = overlay_writer(args, output, args.fps or reader.fps or 24.0)

    def mask_for(index):  # read when a pass reaches the frame (checked: _check_all_masks)
        path = paths.get(index)
        if path is None:
            return None
        return video_io.fit_mask_size(video_io.read_mask(path), hw)[0]

    def written_labels(index):  # a resumed run's masks (checked: _written_masks)
        path = written.get(index)
        return None if path is None else video_io.read_mask(path)

    run = segment_both_directions if args.both_directions else segment_forward
    results = run(seg, frames, mask_for, first, stop,
                  written=written_labels if written else None)
    finished = len(written) == len(indices)
    if finished:  # its overlay only
        results = iter(())
    # else the overlay is written at the end, in video order
    in_order = (first == 0 or not args.both_directions) and not written
    total = len(indices)
    if written:
        print(f"resuming: {len(written)} of {total} masks in {output / 'masks'} kept"
              + ("; the memory is rebuilt from them" if len(written) < total else
                 " (the run was complete: only its overlay is written again)"),
              file=sys.stderr)
    if device is not None and device.type == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats(device)
    # the largest over both passes; the bank's frames, and the storage set aside for them
    objects = memory_frames = memory_bytes = capacity_bytes = 0
    held_bytes = (lambda: seg.memory_bytes) if args.runtime == "onnxruntime" else \
        (lambda: seg.memory_held_bytes)  # the ONNX runner sets no capacity aside

    def segmenting_bar():
        return tqdm(total=total, initial=len(written), unit="frame", disable=args.quiet,
                    desc=f"segmenting {source.name}")

    # A resumed run first replays the kept masks' frames into the memory (each pass its own
    # leading ones): a bar of its own, and the segmenting bar's clock stopped meanwhile, so
    # that its rate and ETA count only the frames segmented.
    def replayed(order):  # a pass's leading frames with kept masks (none when it has them
        # all: a finished pass is skipped)
        return next((n for n, index in enumerate(order) if index not in written), 0)
    passes = [range(first, stop)] + ([range(first, -1, -1)] if args.both_directions and
                                     first > 0 else [])
    replays = [] if finished else [replayed(order) for order in passes]
    replays = [count for count in replays if count]  # frames replayed, pass by pass
    bar = None if replays else segmenting_bar()
    rebuilding, replay_seconds = None, 0.0
    replay = seg.replay

    def replay_shown(*replay_args, **replay_kwargs):
        nonlocal bar, rebuilding, replay_seconds
        tick = time.perf_counter()
        if rebuilding is None and replays:
            rebuilding = tqdm(total=replays[0], unit="frame", disable=args.quiet,
                              desc="rebuilding the memory from the kept masks")
        result = replay(*replay_args, **replay_kwargs)
        if rebuilding is not None:
            rebuilding.update()
            if rebuilding.n >= rebuilding.total:  # this pass's replay is done
                rebuilding.close()
                rebuilding = None
                replays.pop(0)
                if bar is None:
                    bar = segmenting_bar()
                else:
                    bar.unpause()
        replay_seconds += time.perf_counter() - tick
        return result
    if replays:
        seg.replay = replay_shown
    start, count = time.perf_counter(), 0
    try:
        for result in results:
            if bar is None:  # (a replay planned but not made)
                bar = segmenting_bar()
            labels = video_io.as_numpy(result.labels)
            name = result.frame.name
            write_mask(output, name, labels.astype(np.uint8))
            if writer is not None and in_order:
                writer.add(result.frame.image, labels, name=name)
            count += 1
            bar.update()
            objects = max(objects, seg.num_objects)
            memory_frames = max(memory_frames, seg.memory_frames)
            memory_bytes = max(memory_bytes, held_bytes())
            capacity_bytes = max(capacity_bytes, seg.memory_bytes)
        if writer is not None and not in_order:  # in video order, from the masks written
            for frame in frames.range(0 if args.both_directions else first, stop):
                path = output / "masks" / f"{frame.name}.png"
                writer.add(frame.image, video_io.read_mask(path), name=frame.name)
    except BaseException as error:
        for shown in (rebuilding, bar):
            if shown is not None:
                shown.close()
        if writer is not None:
            writer.abort()  # no truncated GIF or video; PNG frames are each complete
        if isinstance(error, video_io.FrameReadError):  # corrupt inside: found when decoded
            raise UsageError(f"{error}; {count + len(written)} of {total} masks are written to "
                             f"{output / 'masks'}: replace that frame and run the same command "
                             "with --resume to continue") from None
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"wrote {count + len(written)} of {total} masks to "
                              f"{output / 'masks'}, each complete (an unfinished overlay video "
                              "or GIF is dropped); run the same command with --resume to "
                              "continue") from None
        raise
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    elapsed = time.perf_counter() - start - replay_seconds  # segmenting only
    summary = {
        "frames": count, **({"kept (resumed)": len(written)} if args.resume else {}),
        "fps": count / elapsed if elapsed else float("nan"),
        "objects": objects, "memory frames": memory_frames,
        "memory bank MiB": memory_bytes / 2**20,
        "memory capacity MiB": capacity_bytes / 2**20,
        "peak memory MiB": _peak_memory_bytes(device) / 2**20,
        "device": "onnxruntime (CPU)" if device is None else str(device),
        "network": "float32" if device is None else _network_precision(seg),
        "masks": str(output / "masks"), "overlay": str(writer.path) if writer else "none",
    }
    width = max(map(len, summary))
    for name, value in summary.items():
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{name:>{width}}: {text}")
    return 0


def _network_precision(segmenter):
    """The summary's network line: the model's dtype, and autocast's where it runs (--amp)."""
    def name(dtype):
        return str(dtype).removeprefix("torch.")
    if segmenter.amp_dtype is None:
        return name(segmenter.model_dtype)
    return f"{name(segmenter.model_dtype)}, {name(segmenter.amp_dtype)} autocast"


def _peak_memory_bytes(device):
    """The run's peak memory: the torch device's (devices.peak_memory_bytes), or the process's
    peak resident set for onnxruntime's CPU run (Linux reports it in KiB)."""
    if device is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from stm_model.runtime.devices import peak_memory_bytes
    return peak_memory_bytes(device)


def _segment_davis_root(args):
    """`stm segment DAVIS_ROOT`: `stm segment-dataset` with the options both commands have."""
    if args.mask or args.masks:
        raise UsageError(f"{args.input} is a DAVIS-format root: its masks come from its "
                         "Annotations folder (drop --mask/--masks)")
    output = args.output or str(pathlib.Path("stm_output") / pathlib.Path(args.input).name)
    dataset_args = _dataset_parser(_Parser(prog="stm segment")).parse_args(
        [args.input, "--output", output])
    for field in options_module.one_video_fields():  # unless segment-dataset has it too
        flag = field.metadata["flag"]
        if flag and getattr(args, field.name) != field.default and \
                field.name not in vars(dataset_args):
            raise UsageError(f"{flag.name} applies to one video, not to a DAVIS-format root "
                             f"({field.metadata['one_video']})")
    if args.both_directions:
        raise UsageError("--both-directions applies to one video, not to a DAVIS-format root")
    if args.runtime != "torch":
        raise UsageError("--runtime onnxruntime applies to one video, not to a DAVIS-format "
                         "root")
    if args.overwrite:
        raise UsageError("--overwrite does not apply to a DAVIS-format root: its segmentation "
                         "resumes, skipping the sequences already in the output; remove "
                         "OUTPUT/<sequence> to redo one")
    for name, value in vars(args).items():  # the options both commands have
        if name in vars(dataset_args) and name not in ("masks", "output", "run") and \
                value is not None:
            setattr(dataset_args, name, value)
    from stm_model.commands.dataset import segment_dataset
    return segment_dataset(dataset_args)
