"""bench.common.run_isolated under Ctrl-C: the child's measurements so far are kept."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bench import common
from helpers import ctrl_c_as_at_a_terminal

CHILD = textwrap.dedent('''
    import argparse, pathlib, sys, time
    from bench import common

    def child(spec):
        frames = 0
        try:
            pathlib.Path(spec["started"]).write_text("started")
            for _ in range(6000):
                time.sleep(0.01)
                frames += 1
        except KeyboardInterrupt:
            return dict(status=f"interrupted at frame {frames}", frames=frames)
        return dict(status="ok", frames=frames)

    common.parse_args_or_run_child(argparse.ArgumentParser(), sys.argv[1:], child)
''')

PARENT = textwrap.dedent('''
    import json, sys
    from bench import common
    payload = dict(date="2026-01-01T00:00:00+00:00", device_type="cpu", records=[])
    try:
        common.run_isolated("slow_child", dict(started=sys.argv[1]), unmap_freed_memory=False)
    except common.Interrupted as stop:
        common.keep_interrupted("slow", payload, stop)
        sys.exit(3)
''')


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT")
def test_an_interrupted_isolated_run_keeps_what_its_child_measured(tmp_path):
    (tmp_path / "slow_child.py").write_text(CHILD)
    started = tmp_path / "started"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(tmp_path)]),
                       STM_BENCH_RESULTS=str(tmp_path / "results"))
    # Its own process group, as a terminal's Ctrl-C or a stage's `timeout -s INT` signals one.
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(started)], cwd=root,
                              env=environment, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, preexec_fn=ctrl_c_as_at_a_terminal)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert parent.poll() is None, parent.stderr.read()
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(parent.pid, signal.SIGINT)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 3, stderr
    saved = list((tmp_path / "results").glob("slow_cpu_*.json"))
    assert len(saved) == 1 and str(saved[0]) in stderr
    payload = json.loads(saved[0].read_text())
    assert payload["complete"] is False
    [record] = payload["records"]
    assert record["status"] == f"interrupted at frame {record['frames']}"
    assert 0 < record["frames"] < 6000


def test_a_child_that_printed_nothing_leaves_no_record(tmp_path, monkeypatch):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    payload = dict(date="2026-01-01T00:00:00+00:00", device_type="cpu", records=[dict(a=1)])
    common.keep_interrupted("slow", payload, common.Interrupted(None))
    saved = json.loads(next(tmp_path.glob("slow_cpu_*.json")).read_text())
    assert saved["records"] == [dict(a=1)] and saved["complete"] is False
    assert common._last_json("progress\n{\"a\": 2}\n") == {"a": 2}
    assert common._last_json("Traceback ...\nKeyboardInterrupt\n") is None
