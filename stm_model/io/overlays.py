"""Overlays: objects coloured over their frames, written as PNGs, a GIF or a video."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:  # overlays are drawn with numpy and PIL alone; tensors are taken too
    import torch

from stm_model.io.annotations import (DAVIS_PALETTE, _check_labels, _size_text, as_numpy,
                                      check_mask_size)
from stm_model.io.files import _temporary_path, write_atomically
from stm_model.io.frames import VIDEO_SUFFIXES, Frame, _import_av


# PyAV container format per video suffix (a temporary file's name does not tell it)
_VIDEO_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


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
        image, size = Image.fromarray(ids), 2 * boundary_width + 1
        # A pixel is on an outline when its neighbourhood holds another id; PIL's rank filters
        # extend the image by its edge pixels, so objects touching the border get no outline
        # along it.
        high = np.asarray(image.filter(ImageFilter.MaxFilter(size)))
        low = np.asarray(image.filter(ImageFilter.MinFilter(size)))
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
            labels = as_numpy(labels)
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
            write_atomically(self.path / f"{name or f'{self.count:05d}'}.png",
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
            write_atomically(self.path, lambda file: first.save(
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
