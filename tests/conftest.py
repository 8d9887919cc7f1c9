"""The tests' shared helpers (tests/helpers.py) importable from every subject folder."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


import subprocess  # noqa: E402

import pytest  # noqa: E402

# A process that takes the lock on argv[1] as argv[2], says so, and holds it until its stdin
# closes; it loads run_lock.py alone (standard library only), so it starts in a moment.
_LOCK_HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[3])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
with run_lock.output_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder():
    """hold(folder, command="stm segment"): another process holding folder's run lock
    (stm_model.io.run_lock), stopped at the test's end."""
    from stm_model.io import run_lock
    processes = []

    def hold(folder, command="stm segment"):
        process = subprocess.Popen(
            [sys.executable, "-c", _LOCK_HOLDER, str(folder), command, run_lock.__file__],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout.readline() == "held\n"
        return process
    yield hold
    for process in processes:
        process.kill()
        process.wait()


@pytest.fixture
def plannings(monkeypatch):
    """{kernel name: times a config was chosen for it} (launch_first_that_runs calls): a pass
    that runs its kept launches adds nothing."""
    from stm_kernels.backends.triton import running
    counts = {}
    real = running.launch_first_that_runs

    def counted(kernel, call, signature, run):
        counts[kernel] = counts.get(kernel, 0) + 1
        return real(kernel, call, signature, run)

    monkeypatch.setattr(running, "launch_first_that_runs", counted)
    return counts


@pytest.fixture
def gluon_plannings(monkeypatch):
    """[WsLaunch] of every plan of the Gluon forward (gluon_forward.prepare calls): a read that
    runs its kept launch adds none."""
    from stm_kernels.experimental import gluon_forward
    planned, real = [], gluon_forward.prepare

    def counted(*args, **kwargs):
        planned.append(real(*args, **kwargs))
        return planned[-1]

    monkeypatch.setattr(gluon_forward, "prepare", counted)
    return planned


@pytest.fixture
def forced_int64(monkeypatch, fresh_launches):
    """Every launch with the int64 in-tile offsets (calls._needs_int64 made True), nothing kept
    from other tests; [the I64 argument of each kernel launched], for the test to check that
    the forcing took."""
    from stm_kernels.backends.triton import calls, running
    flags, real = [], running.run

    def run(kernel, grid, arguments, config, call, **options):
        flags.append(arguments["I64"])
        return real(kernel, grid, arguments, config, call, **options)

    monkeypatch.setattr(calls, "_needs_int64", lambda *tensors, outputs=(): True)
    monkeypatch.setattr(running, "run", run)
    return flags


@pytest.fixture
def fresh_launches(monkeypatch):
    """No remembered choice or kept launch from other tests; outputs NaN-poisoned."""
    from stm_kernels import poison_outputs
    from stm_kernels.backends.triton import kept_launches, running
    monkeypatch.setattr(running, "_chosen", {})
    monkeypatch.setattr(kept_launches, "_prepared", {})
    with poison_outputs():
        yield
