"""Frames: folders of images and video files, read one frame at a time (FrameReader)."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where a tensor is asked for: reading needs numpy alone
    import torch



IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Suffixes (any case) of the frame images that :func:`list_frames` picks up."""

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")
"""Suffixes that :class:`OverlayWriter` writes as an H.264 (or MPEG-4 part 2) video."""

_PYAV_HINT = ('PyAV is needed to read and write video files: pip install '
              '"/path/to/stm-kernels[video]" (your clone), or pip install av')


class FrameReadError(ValueError):
    """A frame (image file, or a frame of a video) that cannot be decoded; the message names
    it."""


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


# The last bytes every complete file of these formats ends with (JPEG's EOI marker may be
# followed by a little padding; PNG's IEND chunk with its CRC closes the file).
_END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND\xaeB`\x82"}


def check_complete(paths: Iterable[str | Path]) -> None:
    """FrameReadError naming the first image file that cannot be a frame of the sequence: not
    an image at all, of another size than the first (read from the headers), or cut short (a
    copy or download that stopped: a JPEG without its end-of-image marker, a PNG without its
    closing IEND chunk). It reads each file's header and last bytes only, so a long video's
    frames are checked in moments, before any work; a file complete but corrupt inside is
    still found when decoded."""
    first = None
    for path in paths:
        path = Path(path)
        try:
            with Image.open(path) as image:
                size = image.size
        except FileNotFoundError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise FrameReadError(f"frame {path} is not an image file (JPEG or PNG)") from None
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise FrameReadError(
                f"frame {path.name} is {size[0]}x{size[1]} (WxH) but frame {first[0].name} is "
                f"{first[1][0]}x{first[1][1]}; all frames of a sequence must have one size "
                "(resize that frame to it)")
        marker = _END_MARKERS.get(path.suffix.lower())
        if marker is None:
            continue
        with open(path, "rb") as file:
            file.seek(max(0, path.stat().st_size - 64))
            tail = file.read()
        if marker not in tail:
            raise FrameReadError(f"frame {path} is cut short (no {path.suffix.lower()[1:].upper()}"
                                 " end marker): a copy or download that stopped?")


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


def to_array(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> contiguous float32 (3, H, W) array in [0, 1] (numpy alone: the
    input of the ONNX runner, and of the torch segmenters, which take arrays too)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    chw = np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)
    chw /= np.float32(255.0)
    return chw


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> contiguous float32 (3, H, W) tensor in [0, 1]: to_array's
    values, shared with torch (no copy)."""
    import torch
    return torch.from_numpy(to_array(image))


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
    def array(self) -> np.ndarray:
        """The frame as a float32 (3, H, W) RGB array in [0, 1] (a new array per call)."""
        return to_array(self.image)

    @property
    def tensor(self) -> torch.Tensor:
        """The frame as a float32 (3, H, W) RGB tensor in [0, 1] (a new tensor per call; the
        values of :attr:`array`)."""
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
