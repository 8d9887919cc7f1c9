"""What several `stm` commands share: the output folder's checks and clean-up, the overlay
writer, JSON written atomically, the segmenter options of the flags. Imports no torch (the
ONNX runner's `stm segment` runs where PyTorch is not installed); the model and device options
are stm_model.commands.models'."""
import json
import sys

from stm_model import io as video_io
from stm_model import metrics
from stm_model.cli import UsageError
from stm_model.inference import options as options_module
from stm_model.io.files import can_write_into, forget_written, note_written, written_files


def segmenter_options(args):
    """SegmenterOptions of the flags parsed by _segmenter_arguments."""
    fields = options_module.cli_fields()
    return options_module.SegmenterOptions(**{field.name: getattr(args, field.name)
                                              for field in fields if hasattr(args, field.name)})


# The model of the segmenting commands when no --checkpoint is named: one shipped in the
# package, so that a run needs no network, no download and no GPU (docs/segmenting.md).
DEFAULT_CHECKPOINT = "small-real"
# The interactive commands' model when none is named: the interactive variant of small-real.
DEFAULT_INTERACTIVE_CHECKPOINT = "small-real-interactive"

OVERLAY_FILES = ("overlay.mp4", "overlay.gif")  # `stm segment`'s overlay outputs, besides
                                                # the folder overlay/ of PNGs


def earlier_results(output):
    """Masks, overlay frames and overlay videos an earlier `stm segment` run left in output,
    and the J&F tables `stm eval` wrote beside them (they would score the old masks)."""
    frames = [path for folder in (output / "masks", output / "overlay") if folder.is_dir()
              for path in folder.iterdir() if path.suffix == ".png"]
    tables = [folder / name for folder in (output, output / "masks")
              for name in (metrics.GLOBAL_CSV, metrics.PER_OBJECT_CSV)
              if (folder / name).is_file()]
    return frames + tables + [output / name for name in OVERLAY_FILES
                              if (output / name).exists()]


def describe_results(paths):
    """What a list of earlier results holds, in words: "3 masks, overlay.mp4, 2 J&F files"."""
    masks = sum(path.parent.name == "masks" and path.suffix == ".png" for path in paths)
    frames = sum(path.parent.name == "overlay" for path in paths)
    tables = sum(path.name in (metrics.GLOBAL_CSV, metrics.PER_OBJECT_CSV) for path in paths)
    parts = [f"{masks} mask{'s' * (masks != 1)}" if masks else "",
             f"{frames} overlay frame{'s' * (frames != 1)}" if frames else "",
             *(path.name for path in paths if path.name in OVERLAY_FILES),
             f"{tables} J&F file{'s' * (tables != 1)}" if tables else ""]
    return ", ".join(filter(None, parts))


def check_folder(output):
    """Check, without creating it yet (a run that fails to start leaves no empty folder), that
    output can be a folder of results: not a file, writable (a read-only filesystem and
    missing permissions alike)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder (it is made if needed)")
    if not can_write_into(output):
        raise UsageError(f"cannot write into the output folder {output} (read-only, or a "
                         "parent is a file); choose another --output")


def claim_output(output, command, enabled=True):
    """check_folder, then the output folder's lock for the run (a context manager, see
    stm_model.io.run_lock): a run already writing into it makes this run fail at once, in one
    line naming it (OutputInUse), before this run changes anything there. Take it before
    check_output: a live run's results are not an earlier run's, to --overwrite."""
    check_folder(output)
    return video_io.output_lock(output, command, enabled=enabled)


def check_output(output, overwrite, resumable=False):
    """check_folder, and that output does not hold an earlier run's masks or overlay frames
    (the runs would mix) unless overwrite. resumable: the command has --resume (the refusal
    says so)."""
    check_folder(output)
    earlier = earlier_results(output)
    if earlier and not overwrite:
        resume = ", --resume to continue it if it was interrupted," if resumable else ""
        raise UsageError(f"{output} already holds the results of an earlier run "
                         f"({describe_results(earlier)}); pass --overwrite to replace them"
                         f"{resume} or choose another --output")


def clear_output(output, keep_masks=False):
    """Remove the masks, overlay frames and videos and J&F files an earlier run wrote (there
    are some only with --overwrite or --resume: see check_output), as the folders' lists of
    written files name them, and the temporary files of writes a run was killed in, so that
    the new run's results are not mixed with older ones; a file no run wrote (a person put it
    there) stays, and a note says so. keep_masks: the masks stay (a resumed run goes on from
    them). Makes the folder."""
    output.mkdir(parents=True, exist_ok=True)
    removed, kept, written = [], [], written_files(output)
    for path in earlier_results(output):
        if keep_masks and path.parent == output / "masks":
            continue
        if path in written or path.name in (metrics.GLOBAL_CSV, metrics.PER_OBJECT_CSV):
            path.unlink(missing_ok=True)  # the J&F tables are stm eval's, named as DAVIS's
            removed.append(path)
        else:
            kept.append(path)
    forget_written(output, removed)
    if kept:
        shown = ", ".join(str(path.relative_to(output)) for path in kept[:3])
        print(f"note: kept {len(kept)} file{'s' * (len(kept) != 1)} in {output} that no run "
              f"wrote ({shown}{', ...' if len(kept) > 3 else ''})", file=sys.stderr)
    for folder in (output, output / "masks", output / "overlay"):
        video_io.remove_temporary_files(folder)


def overlay_writer(args, output, fps):
    """The OverlayWriter of --overlay in output (None for none); what it writes is recorded
    as written by the run (note_written)."""
    if args.overlay == "none":
        return None
    target = output / "overlay" if args.overlay == "png" else output / f"overlay.{args.overlay}"
    return _RecordedOverlayWriter(target, fps=fps)


class _RecordedOverlayWriter(video_io.OverlayWriter):
    """An OverlayWriter whose files are recorded as the run's in its output folder (each frame
    of a PNG folder, the video or GIF file)."""

    def add(self, image, labels=None, name=None):
        if self.kind == "png":  # a folder of PNGs, one per frame
            note_written(self.path.parent, self.path / f"{name or f'{self.count:05d}'}.png")
        super().add(image, labels, name=name)

    def close(self):
        if self.kind != "png":
            note_written(self.path.parent, self.path)
        super().close()


def write_mask(output, name, labels):
    """output/masks/<name>.png (video_io.write_mask), recorded as written by the run."""
    path = output / "masks" / f"{name}.png"
    note_written(output, path)
    video_io.write_mask(path, labels)


def write_json(path, payload):
    """Write JSON atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    video_io.write_atomically(path, lambda file: file.write(
        json.dumps(payload, indent=1).encode()))
