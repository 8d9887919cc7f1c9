"""Keep freed memory inside the process on glibc (Linux) for CPU inference.

By default glibc gives the top of its heap back to the operating system whenever more than a
small amount (dynamically 2x the largest recently freed block) is free, and serves large
blocks with fresh mmaps. A segmentation step allocates and frees its activations every
frame; a batched step (several videos at once) frees more at once, so glibc returns the
memory and the next step page-faults it back as zero-filled pages (the cost is in
bench/NOTES.md). keep_freed_memory() makes glibc keep up to 1 GiB of freed memory (the
process's resident size stays at its peak) and serve blocks below 32 MiB from the heap.

Fixed settings also stop glibc's own adjustment: it raises the mmap threshold to the size of
each mapped block freed, so on a long video, each time the memory bank's storage doubles and
its old storage is freed, more of a step's temporaries move into the heap and the resident
set grows long after the first frames. With the settings above the heap reaches a step's
working size within the first frames, and from there the resident set grows with the memory
bank (docs/performance.md). Used by `stm segment` and `stm segment-dataset` on a CPU.
"""
import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {_M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 1 << 28, _M_MMAP_THRESHOLD: 1 << 25}


def keep_freed_memory():
    """Apply the settings above with mallopt; returns True on glibc, False elsewhere (no-op)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in SETTINGS.items())
