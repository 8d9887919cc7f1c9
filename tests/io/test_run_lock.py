"""stm_model.io.run_lock: one run per output folder (an flock on .stm_run.lock, with a record
of the run holding it). Other holders are real processes: flock is per open file, and the
kernel's release when a holder dies is what makes a lock left by a killed run stale."""
import json
import os
import signal
import socket
import sys

import pytest

from stm_model.io import run_lock
from stm_model.io.run_lock import LOCK_FILE, OutputInUse, OutputLock, output_lock, read_lock

def test_the_lock_file_records_the_run_and_goes_at_release(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with output_lock(folder, "stm segment") as lock:
        record = json.loads((folder / LOCK_FILE).read_text())
        assert lock.held and read_lock(folder) == record
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "stm segment" and record["argv"] == sys.argv
        assert record["started"][:4].isdigit() and "T" in record["started"]
    assert not (folder / LOCK_FILE).exists() and not lock.held
    assert folder.is_dir()  # it was there before: kept, empty or not


def test_a_folder_the_lock_made_goes_when_empty_and_stays_with_results(tmp_path):
    with output_lock(tmp_path / "a" / "b", "stm train"):
        assert (tmp_path / "a" / "b" / LOCK_FILE).is_file()
    assert not (tmp_path / "a").exists()  # a run that failed to start leaves nothing
    with output_lock(tmp_path / "c" / "d", "stm train"):
        (tmp_path / "c" / "d" / "model.pt").write_bytes(b"x")
    assert sorted(os.listdir(tmp_path / "c" / "d")) == ["model.pt"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_when_the_run_raises(tmp_path, error):
    with pytest.raises(error):
        with output_lock(tmp_path, "stm segment"):
            raise error()
    assert not (tmp_path / LOCK_FILE).exists()
    with output_lock(tmp_path, "stm segment"):  # free again
        pass


def test_a_live_holder_is_refused_in_one_line_naming_it(tmp_path, holder):
    process = holder(tmp_path, "stm interactive")
    before = (tmp_path / LOCK_FILE).read_bytes()
    with pytest.raises(OutputInUse) as caught:
        output_lock(tmp_path, "stm segment").acquire()
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, OSError)  # the CLI's user errors
    assert f"pid {process.pid}" in message and "stm interactive" in message
    assert "--overwrite" not in message and "--output" in message
    assert caught.value.record["pid"] == process.pid
    assert (tmp_path / LOCK_FILE).read_bytes() == before  # the holder's record is untouched
    process.stdin.close()
    assert process.wait(timeout=30) == 0
    assert not (tmp_path / LOCK_FILE).exists()
    with output_lock(tmp_path, "stm segment") as lock:
        assert lock.previous is None  # released cleanly: nothing taken over


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, holder):
    process = holder(tmp_path, "stm train")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert read_lock(tmp_path)["pid"] == process.pid  # the file stays; its flock went
    with output_lock(tmp_path, "stm segment") as lock:
        assert lock.previous["pid"] == process.pid
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    """Not reentrant: two writers in one process mix results as well."""
    with output_lock(tmp_path, "stm segment"):
        with pytest.raises(OutputInUse, match=f"pid {os.getpid()}"):
            OutputLock(tmp_path, "stm segment-dataset").acquire()
        assert read_lock(tmp_path)["command"] == "stm segment"
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_disabled_lock_does_nothing(tmp_path, holder):
    holder(tmp_path)
    with output_lock(tmp_path, "stm train", enabled=False) as lock:  # a non-main rank
        assert not lock.held


def test_a_lock_file_replaced_while_waiting_for_it_is_not_taken(tmp_path, monkeypatch):
    """A holder's release unlinks the file while it still holds it: a run that opened the old
    file locks the one now in the folder."""
    real_flock = run_lock.fcntl.flock
    replaced = []

    def flock(fd, operation):
        if not replaced:  # another run releases, and a third takes a new file, meanwhile
            replaced.append(True)
            (tmp_path / LOCK_FILE).unlink()
            (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1}))
        return real_flock(fd, operation)
    monkeypatch.setattr(run_lock.fcntl, "flock", flock)
    (tmp_path / LOCK_FILE).write_text("")
    with output_lock(tmp_path, "stm segment") as lock:
        assert lock.previous == {"pid": 1}  # the record of the file in the folder
        assert read_lock(tmp_path)["pid"] == os.getpid()


def test_without_flock_the_record_s_pid_decides(tmp_path, monkeypatch, holder):
    """A filesystem without flock: a record naming a live process here is a live run; one
    naming a process that has ended is stale."""
    process = holder(tmp_path / "live", "stm segment")
    monkeypatch.setattr(run_lock, "fcntl", None)
    with pytest.raises(OutputInUse, match=f"pid {process.pid}"):
        output_lock(tmp_path / "live", "stm segment").acquire()
    process.kill()
    process.wait()  # killed: its record stays
    with output_lock(tmp_path / "live", "stm segment") as lock:
        assert lock.previous["pid"] == process.pid
