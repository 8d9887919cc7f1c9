"""Annotation masks: PNGs of object ids read and written in the DAVIS palette."""
from __future__ import annotations

from pathlib import Path
import sys
from typing import TYPE_CHECKING, Iterable

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # masks are read and written with numpy alone; tensors are taken too
    import torch

from stm_model.io.files import write_atomically


GRAY_MAX_IDS = 32
"""Grayscale ('L') masks whose gray levels are all at most this are read as object ids."""


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


SIZE_TOLERANCE = 0.01
"""A mask within this fraction of its frame's height and width is resized to it (a mask saved
a pixel short, as Cutie's judo example is) by :func:`fit_mask_size`."""


def fit_mask_size(labels: np.ndarray, frame_hw: tuple[int, int], *, mask_name: str = "",
                  frame_name: str = "") -> tuple[np.ndarray, str]:
    """(labels at the frame's (height, width), note): a mask within :data:`SIZE_TOLERANCE` of
    the frame's size in each dimension is resized to it (nearest neighbour) and the note says
    so in one line ("" when the size was right); other sizes raise check_mask_size's
    ValueError."""
    mask_hw = tuple(int(s) for s in labels.shape[-2:])
    frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
    if mask_hw == frame_hw:
        return labels, ""
    if any(abs(m - f) > SIZE_TOLERANCE * f for m, f in zip(mask_hw, frame_hw, strict=True)):
        check_mask_size(labels, frame_hw, mask_name=mask_name, frame_name=frame_name)
    rows, columns = ((np.arange(f) + 0.5) * m / f for m, f in zip(mask_hw, frame_hw,
                                                                    strict=True))
    resized = labels[..., rows.astype(np.int64)[:, None], columns.astype(np.int64)]
    mask = f"mask {mask_name}" if mask_name else "mask"
    frame = f"its frame {frame_name}" if frame_name else "its frame"
    return resized, (f"{mask} is {_size_text(mask_hw)} (WxH) and {frame} "
                     f"{_size_text(frame_hw)}: resized to the frame's size (nearest neighbour)")


VOID = 255
"""The palette index DAVIS uses for void pixels (unlabelled, e.g. along object borders)."""


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read an annotation PNG as an int64 (H, W) array of object ids (0 = background).

    Modes:
        'P' (palette, DAVIS-2017): the palette indices are the ids (the colours are ignored);
            index 255 (:data:`VOID`) is DAVIS's void label, read as background (never an
            object): :func:`read_annotation` also returns where it is.
        'L' (grayscale): as :func:`gray_to_ids`: 0 and 255 is one object (DAVIS-2016), gray
            levels 1..:data:`GRAY_MAX_IDS` are object ids, anything else is refused.
        'I;16', 'I' (16- or 32-bit grayscale): values 0..:data:`GRAY_MAX_IDS` are the ids; 0
            and the maximum (255 or 65535) alone is one object.
        '1' (bilevel): white -> 1, black -> 0.

    Args:
        path: the PNG file.
        expected_hw: when given, the frame's (height, width); a mask of another size raises
            ValueError via :func:`check_mask_size`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that is not a readable image (named), another mode (RGB, RGBA,
            ...), an ambiguous grayscale mask, or a size mismatch.
    """
    return read_annotation(path, expected_hw)[0]


def read_annotation(path: str | Path, expected_hw: tuple[int, int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, void) of an annotation PNG: the ids as :func:`read_mask` reads them and the
    (H, W) bool mask of its void pixels (palette index 255; none in other modes), which the
    DAVIS evaluation leaves out of J and F."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode, pixels = im.mode, np.asarray(im)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read mask {path}: {error}") from error
    void = np.zeros(pixels.shape[:2], dtype=bool)
    if mode in ("P", "1"):
        labels = pixels.astype(np.int64)
        if mode == "P":
            void = labels == VOID
            labels[void] = 0
    elif mode == "L":
        labels = gray_to_ids(pixels, path)
    elif mode.startswith("I") and pixels.ndim == 2:  # 16/32-bit grayscale: ids as the values
        values = np.unique(pixels)
        if values.min() < 0 or values.max() > GRAY_MAX_IDS and not (
                len(values) <= 2 and values.max() in (255, 65535)):
            raise ValueError(f"mask {path} is {mode} grayscale with values {values[:8].tolist()}"
                             f"{'...' if len(values) > 8 else ''}; object ids must be "
                             f"0..{GRAY_MAX_IDS} (or 0 and the maximum for one object)")
        labels = (pixels > 0).astype(np.int64) if values.max() > GRAY_MAX_IDS else \
            pixels.astype(np.int64)
    else:
        raise ValueError(
            f"mask {path} has image mode {mode!r}; accepted: palette 'P' (indices are "
            "object ids, DAVIS-2017), grayscale 'L' (0 and 255: one object, DAVIS-2016; or "
            f"ids 1..{GRAY_MAX_IDS} as gray levels), 16- or 32-bit grayscale 'I;16' or 'I' "
            f"(ids 0..{GRAY_MAX_IDS}) or bilevel '1'. Convert colour masks to a palette PNG of "
            "object ids")
    if expected_hw is not None:
        check_mask_size(labels, expected_hw, mask_name=path.name)
    return labels, void


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


def as_numpy(array) -> np.ndarray:
    """A numpy array of an array or a torch tensor (on any device)."""
    if is_tensor(array):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def is_tensor(value) -> bool:
    """Whether value is a torch tensor, without importing torch (a process that has not
    imported it holds no tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _check_labels(labels, what: str = "labels") -> np.ndarray:
    """(H, W) integer/bool ids in 0..255 -> uint8 array, with clear errors otherwise."""
    labels = as_numpy(labels)
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
    write_atomically(path, lambda file: im.save(file, format="PNG"))


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
        ValueError: (strict) masks whose name is not a frame name (strict=False leaves
            them out instead).
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
                             f"{example}; masks must be named <frame name>.png: rename or "
                             "remove them")
    return {name: masks[name] for name in frame_names if name in masks}
