"""DAVIS-format input and output: frames, annotation masks, and overlay videos.

Frames
    A sequence is either a folder of images (JPEG/PNG, one per frame, DAVIS layout
    ``JPEGImages/480p/<seq>/00000.jpg``) or a video file (mp4 etc., decoded with PyAV, which is
    an optional dependency: ``pip install "stm-kernels[video]"``). :class:`FrameReader` streams
    the frames one at a time as :class:`Frame` objects, each with a name (the image's stem for
    folders, a zero-padded index ``00000`` for videos), the RGB pixels as a uint8 (H, W, 3)
    array and, via :attr:`Frame.tensor`, as a float32 (3, H, W) tensor in [0, 1].

Masks
    Annotations are PNGs of object ids, read by :func:`read_mask` into an int64 (H, W) array:

    - palette ('P') PNGs (DAVIS-2017 and later, and this module's output): the palette indices
      are the object ids (0 = background, 1..n objects);
    - grayscale ('L') PNGs: 0 and 255 (one gray level above 127) is the DAVIS-2016
      single-object convention (object 1); gray levels 1..32 are object ids; anything else is
      ambiguous and refused (save such masks as palette PNGs);
    - bilevel ('1') PNGs: black is background, white is object 1.

    :func:`write_mask` writes palette PNGs with :data:`DAVIS_PALETTE`, the colour map used by
    the DAVIS benchmark (and PASCAL VOC), atomically (a temporary file renamed into place).

Overlays
    :func:`overlay` blends each object's palette colour over its pixels and outlines it;
    :class:`OverlayWriter` streams overlay frames into a folder of PNGs, an animated GIF or an
    mp4 file (chosen from the path). Every file appears complete or not at all: it is written
    under a temporary name (``.<name>.<random>.tmp``) in its folder and renamed into place.
"""
from __future__ import annotations

import itertools
import os
import re
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DAVIS_PALETTE",
    "GRAY_MAX_IDS",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Frame",
    "FrameReadError",
    "FrameReader",
    "OverlayWriter",
    "check_mask_size",
    "gray_to_ids",
    "list_frames",
    "load_image",
    "masks_for_frames",
    "overlay",
    "read_frames",
    "remove_temporary_files",
    "read_mask",
    "to_tensor",
    "write_mask",
    "write_overlay",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Suffixes (any case) of the frame images that :func:`list_frames` picks up."""

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")
"""Suffixes that :class:`OverlayWriter` writes as an H.264 (or MPEG-4 part 2) video."""

GRAY_MAX_IDS = 32
"""Grayscale ('L') masks whose gray levels are all at most this are read as object ids."""

_PYAV_HINT = 'PyAV is needed to read and write video files: pip install "stm-kernels[video]"'
_TEMPORARY = ".tmp"  # suffix of files being written (see _write_atomically)
# PyAV container format per video suffix (a temporary file's name does not tell it)
_VIDEO_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


class FrameReadError(ValueError):
    """A frame (image file, or a frame of a video) that cannot be decoded; the message names
    it."""


def _temporary_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for the file while it is written."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{_TEMPORARY}")


def _write_atomically(path: str | Path, write) -> None:
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it to
    ``path``: readers, and a run interrupted at any point, see the old file or the complete new
    one, never part of one. The temporary file is removed when ``write`` raises."""
    path = Path(path)
    temporary = _temporary_path(path)
    try:
        with open(temporary, "xb") as file:  # open(): the umask's mode, not mkstemp's 0600
            write(file)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that writes killed mid-file (SIGKILL, power loss) left in
    ``folder``; returns their paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{_TEMPORARY}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _davis_palette() -> np.ndarray:
    """The 256-entry PASCAL-VOC / DAVIS colour map: bit j of the index's r, g, b bit planes
    (bits 0, 1, 2 of each 3-bit group) goes to bit 7 - j of the red, green, blue channel."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, rgb = index, [0, 0, 0]
        for j in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - j)
            c >>= 3
        palette[index] = rgb
    return palette


DAVIS_PALETTE: np.ndarray = _davis_palette()
"""(256, 3) uint8: the DAVIS palette. 0 = black (background), 1 = (128, 0, 0), 2 = (0, 128, 0),
3 = (128, 128, 0), 4 = (0, 0, 128), ... Read-only."""
DAVIS_PALETTE.flags.writeable = False


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def _natural_key(path: Path):
    """Sort key comparing runs of digits as numbers (``2.jpg`` before ``10.jpg``); identical to
    plain name order for zero-padded names such as DAVIS's ``00000.jpg``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", path.name) if part]


def list_frames(folder: str | Path) -> list[Path]:
    """The frame images (``.jpg``/``.jpeg``/``.png``, any case) in ``folder``, sorted by name.

    Names are compared naturally (digit runs as numbers), which is plain name order for
    zero-padded names. Hidden files (``.*``) are ignored.

    Raises:
        FileNotFoundError: the folder does not exist, or holds no frame images.
        NotADirectoryError: ``folder`` is not a directory.
        ValueError: two images share a stem (``00000.jpg`` and ``00000.png``), so frame names
            would be ambiguous.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"frame folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of frame images")
    frames = [p for p in folder.iterdir()
              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    if not frames:
        raise FileNotFoundError(
            f"no frame images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)} files)")
    frames.sort(key=_natural_key)
    seen: dict[str, Path] = {}
    for p in frames:
        if p.stem in seen:
            raise ValueError(f"frames {seen[p.stem].name} and {p.name} in {folder} have the "
                             f"same name {p.stem!r}; keep one of them")
        seen[p.stem] = p
    return frames


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3) (grayscale, palette and RGBA images are
    converted; pixels are taken as stored, EXIF orientation is not applied).

    Raises:
        FileNotFoundError: no such file.
        FrameReadError: a file that is not a decodable image (corrupt, truncated), named.
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise FrameReadError(f"cannot decode frame {path}: {error}") from error


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> contiguous float32 (3, H, W) tensor in [0, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    return torch.from_numpy(chw).to(torch.float32).div_(255.0)


@dataclass(frozen=True)
class Frame:
    """One frame of a sequence.

    Attributes:
        name: the image's stem (folders) or the zero-padded index ``00000`` (videos); masks
            and output PNGs for this frame use the same name.
        index: position in the sequence, from 0.
        image: RGB pixels, uint8 (H, W, 3).
    """

    name: str
    index: int
    image: np.ndarray

    @property
    def tensor(self) -> torch.Tensor:
        """The frame as a float32 (3, H, W) RGB tensor in [0, 1] (a new tensor per call)."""
        return to_tensor(self.image)

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.image.shape[0], self.image.shape[1]


def _import_av():
    """Import PyAV lazily, with an install hint when it is missing."""
    try:
        import av
    except ImportError as error:
        raise ImportError(_PYAV_HINT) from error
    return av


class FrameReader:
    """Streams the frames of a folder of images or a video file, one at a time.

    >>> reader = FrameReader("JPEGImages/480p/bmx-trees")    # or FrameReader("clip.mp4")
    >>> reader.num_frames, reader.fps                        # (80, None) for a folder
    >>> for frame in reader:                                 # Frame(name, index, image)
    ...     x = frame.tensor                                 # float32 (3, H, W) in [0, 1]

    Each iteration re-reads the source from the start; only one decoded frame is held at a
    time, so long videos are never loaded whole. All frames must have the size of the first
    (ValueError otherwise).

    Attributes:
        source: the folder or file.
        is_video: True for a video file.
        paths: the image files in order (folders), else None.
        names: the frame names in order (folders), else None.
        num_frames: the number of frames: exact for folders; for videos the count stored in
            the container header, None when the container does not store one.
        fps: frames per second of a video (its average rate), None for folders.
        hw: (height, width) of a video's frames from its header, None for folders.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: as :func:`list_frames`, for
            folders; FileNotFoundError for a missing file.
        ImportError: a video file without PyAV installed.
        ValueError: a file PyAV cannot open as a video, or a single image file.
        FrameReadError: (while iterating) a frame that cannot be decoded, named.
    """

    def __init__(self, source: str | Path):
        self.source = Path(source)
        self.paths: list[Path] | None = None
        self.names: list[str] | None = None
        self.fps: float | None = None
        self.hw: tuple[int, int] | None = None
        if self.source.is_dir():
            self.is_video = False
            self.paths = list_frames(self.source)
            self.names = [p.stem for p in self.paths]
            self.num_frames: int | None = len(self.paths)
            return
        if not self.source.exists():
            raise FileNotFoundError(f"{self.source} does not exist (expected a folder of frame "
                                    "images or a video file)")
        if self.source.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"{self.source} is a single image; pass the folder of frame images")
        self.is_video = True
        with self._open_video() as container:
            stream = container.streams.video[0]
            self.num_frames = int(stream.frames) or None
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            self.fps = float(rate) if rate else None
            if stream.codec_context.width and stream.codec_context.height:
                self.hw = (stream.codec_context.height, stream.codec_context.width)

    def _open_video(self):
        av = _import_av()
        try:
            container = av.open(str(self.source))
        except av.FFmpegError as error:
            raise ValueError(f"could not open {self.source} as a video: {error}") from error
        if not container.streams.video:
            container.close()
            raise ValueError(f"{self.source} has no video stream")
        return container

    def _images(self) -> Iterator[tuple[str, np.ndarray]]:
        if not self.is_video:
            assert self.paths is not None  # a folder's frame paths
            for path in self.paths:
                yield path.stem, load_image(path)
            return
        av = _import_av()
        container = self._open_video()
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = container.decode(stream)
            for index in itertools.count():
                try:
                    frame = next(frames, None)
                except av.FFmpegError as error:
                    raise FrameReadError(f"cannot decode frame {index:05d} of {self.source}: "
                                         f"{error}") from error
                if frame is None:
                    return
                yield f"{index:05d}", frame.to_ndarray(format="rgb24")
        finally:
            container.close()

    def __iter__(self) -> Iterator[Frame]:
        first_hw, first_name = None, None
        for index, (name, image) in enumerate(self._images()):
            if first_hw is None:
                first_hw, first_name = image.shape[:2], name
            elif image.shape[:2] != first_hw:
                raise ValueError(
                    f"frame {name} of {self.source} is {image.shape[1]}x{image.shape[0]} (WxH) "
                    f"but frame {first_name} is {first_hw[1]}x{first_hw[0]}; all frames of a "
                    "sequence must have one size")
            yield Frame(name=name, index=index, image=image)

    def __repr__(self) -> str:
        kind = "video" if self.is_video else "folder"
        return (f"FrameReader({str(self.source)!r}, {kind}, num_frames={self.num_frames}, "
                f"fps={self.fps})")


def read_frames(source: str | Path) -> Iterator[Frame]:
    """Generator of the :class:`Frame` s of a folder of images or a video file
    (``iter(FrameReader(source))``; use :class:`FrameReader` for the count and frame rate)."""
    return iter(FrameReader(source))


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def _size_text(hw: tuple[int, ...]) -> str:
    return f"{hw[1]}x{hw[0]}"


def check_mask_size(labels: np.ndarray | torch.Tensor, frame_hw: tuple[int, int], *,
                    mask_name: str = "", frame_name: str = "") -> None:
    """Raise ValueError unless the (H, W) ``labels`` have the frame's (height, width).

    The message names both sizes as width x height, e.g. ``mask 00005.png is 853x480 (WxH) but
    its frame is 854x480``. ``mask_name``/``frame_name`` only go into the message.
    """
    mask_hw = tuple(int(s) for s in labels.shape[-2:])
    frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
    if mask_hw != frame_hw:
        mask = f"mask {mask_name}" if mask_name else "mask"
        frame = f"its frame {frame_name}" if frame_name else "its frame"
        raise ValueError(f"{mask} is {_size_text(mask_hw)} (WxH) but {frame} is "
                         f"{_size_text(frame_hw)}; masks must have their frame's size")


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read an annotation PNG as an int64 (H, W) array of object ids (0 = background).

    Modes:
        'P' (palette, DAVIS-2017): the palette indices are the ids (the colours are ignored).
        'L' (grayscale): as :func:`gray_to_ids`: 0 and 255 is one object (DAVIS-2016), gray
            levels 1..:data:`GRAY_MAX_IDS` are object ids, anything else is refused.
        '1' (bilevel): white -> 1, black -> 0.

    Args:
        path: the PNG file.
        expected_hw: when given, the frame's (height, width); a mask of another size raises
            ValueError via :func:`check_mask_size`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that is not a readable image (named), another mode (RGB, RGBA,
            16-bit, ...), an ambiguous grayscale mask, or a size mismatch.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode, pixels = im.mode, np.asarray(im)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read mask {path}: {error}") from error
    if mode in ("P", "1"):
        labels = pixels.astype(np.int64)
    elif mode == "L":
        labels = gray_to_ids(pixels, path)
    else:
        raise ValueError(
            f"mask {path} has image mode {mode!r}; accepted: palette 'P' (indices are "
            "object ids, DAVIS-2017), grayscale 'L' (0 and 255: one object, DAVIS-2016; or "
            f"ids 1..{GRAY_MAX_IDS} as gray levels) or bilevel '1'. Convert colour masks to a "
            "palette PNG of object ids")
    if expected_hw is not None:
        check_mask_size(labels, expected_hw, mask_name=path.name)
    return labels


def gray_to_ids(gray: np.ndarray, path: str | Path = "") -> np.ndarray:
    """Object ids (int64) of a grayscale mask's pixels.

    The gray levels present tell the convention: a single nonzero level above 127 is one
    object, id 1 (DAVIS-2016 files hold 0 and 255); levels all within 1..:data:`GRAY_MAX_IDS`
    are the object ids themselves. Anything else (say 0, 1 and 255, or an anti-aliased mask)
    could be read either way, so it raises ValueError naming ``path``.
    """
    levels = np.unique(gray)
    nonzero = levels[levels > 0]
    if len(nonzero) == 1 and nonzero[0] > 127:
        return (gray > 127).astype(np.int64)
    if not len(nonzero) or nonzero[-1] <= GRAY_MAX_IDS:
        return gray.astype(np.int64)
    shown = ", ".join(str(int(v)) for v in levels[:8]) + (", ..." if len(levels) > 8 else "")
    raise ValueError(
        f"grayscale mask {path} holds the gray levels {shown}: neither one object (0 and 255, "
        f"DAVIS-2016) nor object ids 1..{GRAY_MAX_IDS}; save object ids as a palette ('P') PNG")


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _check_labels(labels, what: str = "labels") -> np.ndarray:
    """(H, W) integer/bool ids in 0..255 -> uint8 array, with clear errors otherwise."""
    labels = _as_numpy(labels)
    if labels.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) array of object ids, got shape "
                         f"{labels.shape}")
    if labels.dtype != np.bool_ and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{what} must hold integer object ids, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{what} ids must be in 0..255 (one palette index each), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return labels.astype(np.uint8)


def write_mask(path: str | Path, labels: np.ndarray | torch.Tensor) -> None:
    """Write (H, W) object ids (0..255, integer or bool) as a palette PNG with
    :data:`DAVIS_PALETTE`, the DAVIS-2017 format. Creates the parent folder if needed. The
    file is written atomically: an interrupted write leaves the previous file (or none), never
    part of one.

    Raises:
        ValueError: not 2-D, or an id outside 0..255. TypeError: a non-integer dtype.
    """
    ids = _check_labels(labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids)  # mode 'L'; putpalette turns it into 'P'
    im.putpalette(DAVIS_PALETTE.tobytes())
    _write_atomically(path, lambda file: im.save(file, format="PNG"))


def masks_for_frames(frame_names: Iterable[str], mask_folder: str | Path, *,
                     strict: bool = True) -> dict[str, Path]:
    """Map each frame that has an annotation to its mask: ``{frame_name: mask_folder/name.png}``.

    For sequences annotated on some frames only (objects that appear later get their mask on
    the frame where they enter). The result follows the frame order.

    Args:
        frame_names: the sequence's frame names, in order (e.g. ``FrameReader(...).names``).
        mask_folder: folder of ``<frame name>.png`` masks.
        strict: raise when a mask matches no frame (usually a naming mistake such as ``0.png``
            for frame ``00000``); with False such masks are ignored.

    Raises:
        FileNotFoundError: the folder does not exist or holds no PNG.
        ValueError: (strict) masks whose name is not a frame name.
    """
    mask_folder = Path(mask_folder)
    if not mask_folder.is_dir():
        raise FileNotFoundError(f"mask folder {mask_folder} does not exist")
    masks = {p.stem: p for p in mask_folder.iterdir()
             if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith(".")}
    if not masks:
        raise FileNotFoundError(f"no PNG masks in {mask_folder}")
    frame_names = list(frame_names)
    if strict:
        unmatched = sorted(set(masks) - set(frame_names))
        if unmatched:
            shown = ", ".join(masks[n].name for n in unmatched[:5])
            more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
            example = f" (frames are named like {frame_names[0]!r})" if frame_names else ""
            raise ValueError(f"masks {shown}{more} in {mask_folder} match no frame name"
                             f"{example}; masks must be named <frame name>.png (or pass "
                             "strict=False to ignore them)")
    return {name: masks[name] for name in frame_names if name in masks}


# --------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------


def overlay(frame: np.ndarray, labels: np.ndarray | torch.Tensor, alpha: float = 0.5,
            boundary_width: int = 1) -> np.ndarray:
    """Colour the objects of ``labels`` over ``frame``.

    Object pixels (id > 0) become ``(1 - alpha) * pixel + alpha * DAVIS_PALETTE[id]``, rounded;
    background pixels are unchanged. A boundary of ``boundary_width`` pixels along the inside of
    each object's outline (not along the image border) is drawn in the object's colour
    (0 disables it).

    Args:
        frame: uint8 (H, W, 3) RGB (e.g. ``Frame.image``).
        labels: (H, W) object ids in 0..255, same size as the frame.
        alpha: colour weight in [0, 1].
        boundary_width: outline thickness in pixels, >= 0.

    Returns:
        a new uint8 (H, W, 3) array.
    """
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be uint8 (H, W, 3) RGB, got {frame.dtype} {frame.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if boundary_width < 0:
        raise ValueError(f"boundary_width must be >= 0, got {boundary_width}")
    ids = _check_labels(labels)
    check_mask_size(ids, frame.shape[:2])
    out = frame.copy()
    objects = ids > 0
    if not objects.any():
        return out
    colours = DAVIS_PALETTE[ids[objects]].astype(np.float32)
    pixels = out[objects].astype(np.float32)
    out[objects] = np.clip(np.rint(pixels + alpha * (colours - pixels)), 0, 255).astype(np.uint8)
    if boundary_width > 0:
        from scipy import ndimage

        size = 2 * boundary_width + 1
        # A pixel is on an outline when its neighbourhood holds another id; 'nearest' extends
        # the image, so objects touching the border get no outline along it.
        high = ndimage.maximum_filter(ids, size=size, mode="nearest")
        low = ndimage.minimum_filter(ids, size=size, mode="nearest")
        edge = objects & (high != low)
        out[edge] = DAVIS_PALETTE[ids[edge]]
    return out


def _video_rate(fps: float) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return rate


class OverlayWriter:
    """Streaming writer of overlay frames; the format follows ``path``:

    - ``*.gif``: an animated GIF (looping), each frame shown ``1000 / fps`` ms (GIF stores
      hundredths of a second). Frames are kept, quantised to 1 byte per pixel, until
      :meth:`close` writes the file (Pillow writes GIFs in one go), so GIFs suit short clips;
      Pillow merges identical consecutive frames into one longer frame.
    - ``*.mp4`` / ``*.mov`` / ``*.mkv``: H.264 (libx264, CRF 18; MPEG-4 part 2 where libx264 is
      unavailable), yuv420p, at ``fps``, through PyAV. Frames are encoded as they arrive.
      yuv420p needs even sizes: an odd width or height is padded by one column/row on the
      right/bottom, repeating the edge pixels (nothing is cropped).
    - anything else without a suffix (or an existing folder): a folder of PNGs, one per frame,
      named ``<name>.png`` with the frame's name (default: its zero-padded index).

    All frames must have the size of the first. Use as a context manager, or call
    :meth:`close`::

        with OverlayWriter("out.mp4", fps=reader.fps or 24) as writer:
            for frame in reader:
                writer.add(frame.image, labels[frame.name], name=frame.name)

    Files appear complete or not at all: each PNG is written atomically, and a GIF or video is
    written under a temporary name renamed to ``path`` by :meth:`close`. :meth:`abort` (what
    the context manager does when its block raises) drops an unfinished GIF or video, so an
    interrupted run leaves no truncated file.
    """

    def __init__(self, path: str | Path, fps: float = 24.0, *, alpha: float = 0.5,
                 boundary_width: int = 1):
        self.path = Path(path)
        self.fps = float(fps)
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.alpha = alpha
        self.boundary_width = boundary_width
        suffix = self.path.suffix.lower()
        if suffix == ".gif":
            self.kind = "gif"
        elif suffix in VIDEO_SUFFIXES:
            self.kind = "video"
        elif self.path.is_dir() or suffix == "":
            self.kind = "png"
        else:
            raise ValueError(f"cannot tell the output format of {self.path}: use a .gif file, a "
                             f"{'/'.join(VIDEO_SUFFIXES)} file, or a folder (no suffix) for PNGs")
        if self.kind == "png":
            if self.path.exists() and not self.path.is_dir():
                raise NotADirectoryError(f"{self.path} exists and is not a folder")
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._hw: tuple[int, int] | None = None
        self._gif_frames: list[Image.Image] = []
        self._container: Any = None  # av containers and streams are untyped
        self._stream: Any = None
        self._temporary: Any = None  # Path of the video while it is written
        self._closed = False
        if self.kind == "video":
            _import_av()  # fail before any frame is added

    def add(self, image: np.ndarray, labels: np.ndarray | torch.Tensor | None = None,
            name: str | None = None) -> None:
        """Append one frame: ``image`` uint8 (H, W, 3) RGB, overlaid with ``labels`` (via
        :func:`overlay`, with this writer's alpha and boundary width) when given. ``name`` names
        the PNG in folder output (default: the zero-padded frame index)."""
        if self._closed:
            raise ValueError(f"OverlayWriter for {self.path} is closed")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} "
                             f"{image.shape}")
        if labels is not None:
            labels = _as_numpy(labels)
            check_mask_size(labels, image.shape[:2], frame_name=name or "")
            image = overlay(image, labels, self.alpha, self.boundary_width)
        hw = image.shape[:2]
        if self._hw is None:
            self._hw = hw
        elif hw != self._hw:
            raise ValueError(f"frame {name or self.count} is {_size_text(hw)} (WxH) but the "
                             f"first frame written to {self.path} is {_size_text(self._hw)}")
        if self.kind == "png":
            picture = Image.fromarray(image)
            _write_atomically(self.path / f"{name or f'{self.count:05d}'}.png",
                              lambda file: picture.save(file, format="PNG"))
        elif self.kind == "gif":
            self._gif_frames.append(Image.fromarray(image).quantize(colors=256))
        else:
            self._add_video(image)
        self.count += 1

    def _add_video(self, image: np.ndarray) -> None:
        av = _import_av()
        h, w = image.shape[:2]
        if h % 2 or w % 2:
            image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._container is None:
            self._temporary = _temporary_path(self.path)
            container = av.open(str(self._temporary), mode="w",
                                format=_VIDEO_FORMATS[self.path.suffix.lower()])
            try:
                codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
                stream = container.add_stream(codec, rate=_video_rate(self.fps))
                stream.width, stream.height = image.shape[1], image.shape[0]
                stream.pix_fmt = "yuv420p"
                if codec == "libx264":
                    stream.options = {"crf": "18"}
                else:
                    stream.bit_rate = 8_000_000
            except Exception:
                container.close()
                self._temporary.unlink(missing_ok=True)
                raise
            self._container, self._stream = container, stream
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        """Finish the output (flush the encoder / write the GIF) and move it to ``path``. Safe
        to call twice. An error (or an interrupt) while finishing leaves no file behind."""
        if self._closed:
            return
        self._closed = True
        if self.kind == "gif" and self._gif_frames:
            first, *rest = self._gif_frames
            self._gif_frames = []
            _write_atomically(self.path, lambda file: first.save(
                file, format="GIF", save_all=True, append_images=rest, loop=0,
                duration=max(10, round(1000.0 / self.fps))))
        elif self.kind == "video" and self._container is not None:
            try:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
                self._container.close()
                os.replace(self._temporary, self.path)
            except BaseException:
                self._discard_video()
                raise

    def abort(self) -> None:
        """Stop without finishing: an unfinished GIF or video is dropped (no file is written;
        a previous file at ``path`` is left as it was); PNG frames already written stay, each
        complete. Safe to call after :meth:`close`."""
        if self._closed:
            return
        self._closed = True
        self._gif_frames = []
        self._discard_video()

    def _discard_video(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # a half-written container may fail to close; it is dropped
                pass
            self._container = None
        if self._temporary is not None:
            self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> "OverlayWriter":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (f"OverlayWriter({str(self.path)!r}, {self.kind}, fps={self.fps}, "
                f"frames={self.count})")


def write_overlay(path: str | Path, frames: Iterable[Frame | np.ndarray],
                  labels: Mapping[str, np.ndarray] | Iterable[np.ndarray | None] | None = None,
                  fps: float = 24.0, alpha: float = 0.5) -> int:
    """Write a whole sequence with :class:`OverlayWriter` and return the number of frames.

    Args:
        path: ``.gif``, ``.mp4``/``.mov``/``.mkv`` file, or a folder for PNGs.
        frames: :class:`Frame` objects (their names name the PNGs) or uint8 (H, W, 3) images;
            consumed one at a time, e.g. a :class:`FrameReader`.
        labels: per-frame (H, W) ids: a mapping from frame name (frames without an entry are
            written as they are), or an iterable parallel to ``frames`` (None entries allowed);
            None writes the frames unchanged.
        fps: frame rate for GIF and video.
        alpha: overlay colour weight.
    """
    label_iter = None
    if labels is not None and not isinstance(labels, Mapping):
        label_iter = iter(labels)
    with OverlayWriter(path, fps=fps, alpha=alpha) as writer:
        for index, frame in enumerate(frames):
            if isinstance(frame, Frame):
                name, image = frame.name, frame.image
            else:
                name, image = f"{index:05d}", frame
            if isinstance(labels, Mapping):
                frame_labels = labels.get(name)
            elif label_iter is not None:
                frame_labels = next(label_iter, None)
            else:
                frame_labels = None
            writer.add(image, frame_labels, name=name)
        return writer.count
