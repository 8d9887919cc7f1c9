"""CPU benchmarks time with glibc's allocator as it is and take their memory peaks from a second
run under one that unmaps every freed block (bench.common.speed_then_peak)."""
import os
import textwrap

import torch

from bench import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A stand-in benchmark child: it says which allocator it ran under, and "peaks" that show it.
CHILD = textwrap.dedent('''
    import argparse, os, sys
    from bench import common

    def child(spec):
        unmapping = os.environ.get("MALLOC_MMAP_THRESHOLD_") == "65536"
        return dict(status="ok", unmapping=unmapping,
                    checkpoints=[dict(length=n, peak_mem_bytes=1000 * n if unmapping else -1)
                                 for n in spec["lengths"]])

    common.parse_args_or_run_child(argparse.ArgumentParser(), sys.argv[1:], child)
''')


def _child_module(tmp_path, monkeypatch):
    (tmp_path / "allocator_child.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, str(tmp_path)]))
    return "allocator_child"


def test_a_cpu_record_is_timed_as_is_and_takes_the_second_runs_peaks(tmp_path, monkeypatch):
    module = _child_module(tmp_path, monkeypatch)
    rows = lambda record: record["checkpoints"]  # noqa: E731
    record = common.speed_then_peak(
        module, dict(lengths=[1, 2, 3]), torch.device("cpu"), common.merge_peaks_by_length(rows),
        peak_spec=lambda record: dict(lengths=[1, 3]))
    assert record["unmapping"] is False  # the speed run: glibc's defaults
    assert [row["peak_mem_bytes"] for row in record["checkpoints"]] == [1000, None, 3000]
    assert record["memory_status"] == "ok"


def test_a_gpu_record_is_one_run_and_a_skipped_peak_run_leaves_the_record(tmp_path,
                                                                          monkeypatch):
    module = _child_module(tmp_path, monkeypatch)
    merged = []
    record = common.speed_then_peak(module, dict(lengths=[2]), torch.device("cuda"),
                                    lambda record, memory: merged.append(memory))
    assert record["unmapping"] is True and merged == []  # one run, as before (CUDA peaks)
    record = common.speed_then_peak(module, dict(lengths=[2]), torch.device("cpu"),
                                    lambda record, memory: merged.append(memory),
                                    peak_spec=lambda record: None)
    assert record["unmapping"] is False and merged == []

