"""Files that appear complete or not at all: every write goes to a hidden temporary name
beside its target and is renamed into place; what a killed run leaves is removed by
remove_temporary_files."""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path


_TEMPORARY = ".tmp"  # suffix of files being written (see write_atomically)

def _temporary_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for the file while it is written."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{_TEMPORARY}")


def write_atomically(path: str | Path, write) -> None:
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it to
    ``path``: readers, and a run interrupted at any point, see the old file or the complete new
    one, never part of one. The temporary file is removed when ``write`` raises."""
    path = Path(path)
    temporary = _temporary_path(path)
    try:
        file = open(temporary, "xb")  # open(): the umask's mode, not mkstemp's 0600
    except OSError as error:  # name the file asked for, not the temporary one
        raise type(error)(error.errno, f"cannot write {path}: {error.strerror}") from None
    try:
        with file:
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


def can_write_into(folder: str | Path) -> bool:
    """Whether files can be created in `folder` (or, where it does not exist yet, in its nearest
    existing parent, where it would be made): a file is created there and removed, so a
    read-only filesystem and missing permissions both count, whoever runs it."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=existing):
            return True
    except OSError:
        return False
