"""Files that appear complete or not at all: every write goes to a hidden temporary name
beside its target and is renamed into place; what a killed run leaves is removed by
remove_temporary_files. An output folder's list of the files runs wrote under it
(note_written, written_files) lets --overwrite remove those and nothing a person put there."""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Iterable


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


WRITTEN = ".stm_written"  # in an output folder: the files runs of stm wrote under it


def note_written(output: str | Path, *paths: str | Path) -> None:
    """Record files under `output` as written by this run: their paths relative to it are
    appended to output/WRITTEN, so that a later --overwrite removes what runs wrote there and
    nothing else."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / WRITTEN, "a", encoding="utf-8") as file:
        file.write("".join(f"{Path(path).relative_to(output).as_posix()}\n" for path in paths))


def written_files(output: str | Path) -> set:
    """The paths (under output) that runs recorded as written there (note_written)."""
    listing = Path(output) / WRITTEN
    if not listing.is_file():
        return set()
    return {Path(output) / name for name in listing.read_text(encoding="utf-8").splitlines()
            if name}


def forget_written(output: str | Path, removed: Iterable[str | Path]) -> None:
    """Drop removed files from output's list of written files."""
    listing = Path(output) / WRITTEN
    remaining = written_files(output) - {Path(path) for path in removed}
    if remaining:
        names = sorted(path.relative_to(output).as_posix() for path in remaining)
        write_atomically(listing, lambda file: file.write("".join(
            f"{name}\n" for name in names).encode()))
    else:
        listing.unlink(missing_ok=True)
