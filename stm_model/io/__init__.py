"""Video and mask input and output (DAVIS format): frames, annotation masks, and overlay videos.

Frames
    A sequence is either a folder of images (JPEG/PNG, one per frame, DAVIS layout
    ``JPEGImages/480p/<seq>/00000.jpg``) or a video file (mp4 etc., decoded with PyAV, which is
    an optional dependency: ``pip install "/path/to/stm-kernels[video]"`` from a clone).
    :class:`FrameReader` streams the frames one at a time as :class:`Frame` objects, each with
    a name (the image's stem for folders, a zero-padded index ``00000`` for videos), the RGB
    pixels as a uint8 (H, W, 3) array and, via :attr:`Frame.array` (numpy) or
    :attr:`Frame.tensor` (torch), as float32 (3, H, W) in [0, 1]. Reading frames and masks
    needs numpy and PIL alone (PyTorch is imported only for :attr:`Frame.tensor`).

Masks
    Annotations are PNGs of object ids, read by :func:`read_mask` into an int64 (H, W) array:

    - palette ('P') PNGs (DAVIS-2017 and later, and this module's output): the palette indices
      are the object ids (0 = background, 1..n objects);
    - grayscale ('L') PNGs: 0 and 255 (one gray level above 127) is the DAVIS-2016
      single-object convention (object 1); gray levels 1..32 are object ids; anything else is
      ambiguous and refused (save such masks as palette PNGs);
    - 16- and 32-bit grayscale ('I;16', 'I') PNGs: values 0..32 are object ids, and 0 with
      the maximum (255 or 65535) alone is one object;
    - bilevel ('1') PNGs: black is background, white is object 1;
    - any other mode (RGB, RGBA, ...) is refused, naming the file.

    :func:`fit_mask_size` resizes a mask within 1% of its frame's size to it (the segmenting
    commands do, with a note); other sizes are refused.

    :func:`write_mask` writes palette PNGs with :data:`DAVIS_PALETTE`, the colour map used by
    the DAVIS benchmark (and PASCAL VOC), atomically (a temporary file renamed into place).

Overlays
    :func:`overlay` blends each object's palette colour over its pixels and outlines it;
    :class:`OverlayWriter` streams overlay frames into a folder of PNGs, an animated GIF or an
    mp4 file (chosen from the path). Every file appears complete or not at all: it is written
    under a temporary name (``.<name>.<random>.tmp``) in its folder and renamed into place.

Output folders
    :func:`output_lock` holds an output folder for one run (an flock on ``.stm_run.lock`` in
    it, with the run's pid and command): a second run into the folder is refused at once
    (:class:`OutputInUse`), and a lock left by a killed run is taken over.
"""

from stm_model.io.files import remove_temporary_files, write_atomically
from stm_model.io.frames import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, Frame, FrameReadError,
                                 check_complete, FrameReader, list_frames, load_image,
                                 read_frames, to_array, to_tensor)
from stm_model.io.annotations import (DAVIS_PALETTE, GRAY_MAX_IDS, SIZE_TOLERANCE, VOID,
                                      as_numpy, check_mask_size, fit_mask_size, gray_to_ids,
                                      is_tensor, masks_for_frames, read_annotation, read_mask,
                                      write_mask)
from stm_model.io.overlays import OverlayWriter, overlay, write_overlay
from stm_model.io.run_lock import LOCK_FILE, OutputInUse, OutputLock, output_lock

__all__ = [
    "DAVIS_PALETTE", "GRAY_MAX_IDS", "SIZE_TOLERANCE", "VOID", "IMAGE_SUFFIXES", "LOCK_FILE",
    "VIDEO_SUFFIXES", "Frame", "FrameReadError", "FrameReader", "OutputInUse", "OutputLock",
    "OverlayWriter", "as_numpy", "check_complete", "check_mask_size", "fit_mask_size",
    "gray_to_ids", "is_tensor", "list_frames", "load_image", "masks_for_frames",
    "output_lock", "overlay", "read_annotation", "read_frames", "remove_temporary_files",
    "read_mask", "to_array", "to_tensor", "write_atomically", "write_mask", "write_overlay",
]
