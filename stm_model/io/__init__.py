"""Video and mask input and output (DAVIS format): frames, annotation masks, and overlay videos.

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

from stm_model.io.files import remove_temporary_files, write_atomically
from stm_model.io.frames import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, Frame, FrameReadError,
                                 check_complete, FrameReader, list_frames, load_image,
                                 read_frames, to_tensor)
from stm_model.io.annotations import (DAVIS_PALETTE, GRAY_MAX_IDS, VOID, check_mask_size,
                                      gray_to_ids, masks_for_frames, read_annotation, read_mask,
                                      write_mask)
from stm_model.io.overlays import OverlayWriter, overlay, write_overlay

__all__ = [
    "DAVIS_PALETTE", "GRAY_MAX_IDS", "VOID", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "Frame",
    "FrameReadError", "FrameReader", "OverlayWriter", "check_complete", "check_mask_size",
    "gray_to_ids", "list_frames", "load_image", "masks_for_frames", "overlay", "read_annotation",
    "read_frames", "remove_temporary_files", "read_mask", "to_tensor", "write_atomically",
    "write_mask", "write_overlay",
]
