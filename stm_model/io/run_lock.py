"""One run at a time per output folder, so that two runs never mix their results. A run holds
an exclusive ``flock`` on ``<folder>/.stm_run.lock`` for its whole life, and the file records
who holds it (pid, host, command, command line, start time): a second run is refused at once,
naming the first.

flock, not a pid file alone: the kernel releases the lock when the holder's process ends,
however it ends (SIGKILL, a crash, power loss), so a lock file left behind is stale exactly
when its flock is free, and pid reuse cannot keep a folder locked. The lock is released, and
its file removed, when the run ends normally, raises or is interrupted (Ctrl-C).
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the pid record alone (see _record_is_live)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".stm_run.lock"  # in an output folder, while a run writes into it


class OutputInUse(OSError):
    """The output folder is held by another live run; the message names it (one line)."""

    def __init__(self, message, record):
        super().__init__(message)
        self.record = record


class OutputLock:
    """An exclusive lock on an output folder for one run (a context manager).

    acquire() makes the folder if needed and takes the lock, or raises OutputInUse naming the
    run that holds it, before anything in the folder is changed; a lock file whose holder has
    ended (its flock is free) is taken over, and its record kept in ``previous``. release()
    removes the lock file and the folders acquire() made, where they are still empty (a run
    that fails to start leaves nothing behind). Not reentrant: a second lock on the same
    folder is refused in the same process too (two writers in one process mix results as
    well). enabled=False: a lock that does nothing (the non-main processes of a distributed
    run, whose main process holds it)."""

    def __init__(self, folder, command, *, enabled=True):
        self.folder, self.command, self.enabled = Path(folder), command, enabled
        self.path = self.folder / LOCK_FILE
        self.previous = None  # the record of a stale lock taken over
        self._fd = None
        self._made = []

    @property
    def held(self):
        return self._fd is not None

    def record(self):
        """What the lock file says about this run."""
        return dict(pid=os.getpid(), host=socket.gethostname(), command=self.command,
                    argv=list(sys.argv),
                    started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

    def acquire(self):
        if not self.enabled or self.held:
            return self
        self._made = _missing_folders(self.folder)
        try:
            self._fd = self._lock()
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.write(self._fd, json.dumps(self.record()).encode() + b"\n")
        except BaseException:
            self.release()
            self._remove_made_folders()
            raise
        return self

    def release(self):
        if not self.held:
            return
        fd, self._fd = self._fd, None
        try:
            # unlinked while still locked: a run that opened this file meanwhile finds it gone
            # from the folder once it gets the flock, and locks a new one (see _lock)
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)
        self._remove_made_folders()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()

    def _lock(self):
        """The file descriptor of the lock file, locked; OutputInUse when a live run holds it."""
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                             0o644)
            except FileNotFoundError:  # the folder was removed meanwhile by a run's release
                continue
            try:
                live = _try_flock(fd)
                if live is None:  # no flock on this filesystem: the record decides
                    record = _read_record(fd, wait=0)
                    live = record is not None and _record_is_live(record)
                if live:
                    record = _read_record(fd)
                    raise OutputInUse(_busy_message(self.folder, record), record)
                if not _same_file(fd, self.path):  # released (unlinked) before we locked it
                    os.close(fd)
                    continue
                self.previous = _read_record(fd, wait=0)  # a stale run's record, if any
                return fd
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise

    def _remove_made_folders(self):
        for folder in reversed(self._made):  # innermost first; one holding files stays
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []


def output_lock(folder, command, *, enabled=True):
    """OutputLock(folder, command): ``with output_lock(output, "stm segment"): ...``."""
    return OutputLock(folder, command, enabled=enabled)


def read_lock(folder):
    """The record in folder's lock file (a dict), or None where there is none."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_record(fd, wait=0)
    finally:
        os.close(fd)


def _missing_folders(folder):
    """The folders that making `folder` would create, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _try_flock(fd):
    """Lock fd: False when taken, True when another open file holds it, None where this
    filesystem (or platform) has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return False


def _same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_record(fd, wait=1.0):
    """The JSON record in the lock file, or None; a holder writes it just after taking the
    lock, so an empty or partial one is read again for up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            record = json.loads(os.read(fd, 1 << 16).decode())
            if isinstance(record, dict):
                return record
        except (OSError, UnicodeDecodeError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _record_is_live(record):
    """Without flock: whether the record's run is alive (another process on this host that
    exists); a record from another host counts as live (it cannot be checked)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname():
        return True
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def _busy_message(folder, record):
    if not record:
        return (f"{folder} is in use by another run (its lock file {LOCK_FILE} names none "
                "yet); wait for it to end, or choose another --output")
    command = record.get("command") or "stm"
    host = record.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    argv = record.get("argv")
    line = f", command line: {_shown(argv)}" if isinstance(argv, list) and argv else ""
    return (f"{folder} is in use by another run: {command} (pid {record.get('pid')}{where}, "
            f"started {record.get('started')}{line}); wait for it to end, or choose another "
            "--output")


def _shown(argv, limit=200):
    text = shlex.join(str(part) for part in argv)
    return text if len(text) <= limit else text[:limit - 3] + "..."
