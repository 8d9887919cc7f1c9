"""tools.gpu_session.tune and tools.gpu_session.baseline in the Triton interpreter (a logic
check: tiny shapes, no GPU).

An earlier commit's kernels are exported beside the current ones and both are timed and
checked against the torch backend in one run, as the GPU session does at the target shape.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The commit before the kernel rewrite (64-row forward, dK/dV + dQ backward).
BASELINE_REVISION = "7acb609"


def _has_revision(revision):
    completed = subprocess.run(["git", "cat-file", "-e", f"{revision}^{{commit}}"], cwd=ROOT,
                               capture_output=True)
    return completed.returncode == 0


@pytest.mark.skipif(not _has_revision(BASELINE_REVISION),
                    reason=f"commit {BASELINE_REVISION} not in this clone (shallow?)")
def test_tune_times_current_tilings_and_an_exported_baseline(tmp_path):
    pytest.importorskip("triton")
    from tools.gpu_session import baseline
    exported = baseline.export(BASELINE_REVISION, tmp_path / "baseline")
    assert "stm_kernels_baseline::" in (exported / "stm_kernels" / "memory_read.py").read_text()
    environment = dict(os.environ, TRITON_INTERPRET="1", STM_BENCH_RESULTS=str(tmp_path))
    completed = subprocess.run(
        [sys.executable, "-m", "tools.gpu_session.tune", "--quick", "--dtype", "fp32", "--ns", "70",
         "--batches", "2", "--hw", "20", "--ck", "16", "--cv", "24", "--baseline",
         str(exported)], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload = json.loads(next(tmp_path.glob("tune_*.json")).read_text())
    kinds = {record["kind"] for record in payload["records"]}
    assert kinds == {"forward", "backward", "baseline"}
    assert any(record["config"].startswith("deterministic dq ") for record in payload["records"])
    assert payload["baseline"] == BASELINE_REVISION
    # The new defaults, then the old kernels: what a run cut off by a time limit keeps.
    assert [(r["kind"], r["pass_"]) for r in payload["records"][:4]] == [
        ("forward", "fwd"), ("backward", "fwd+bwd"), ("baseline", "fwd"), ("baseline", "fwd+bwd")]
    for record in payload["records"]:
        assert record["ok"], record  # every tiling and the old kernels match the torch backend


def test_candidates_put_the_defaults_first_and_the_gluon_kernels_last():
    """The Gluon kernels may poison the CUDA context (the backward's have never run on a
    GPU): they are timed after everything else; the defaults come first."""
    pytest.importorskip("triton")
    import torch

    from tools.gpu_session import tune
    for dtype in (torch.bfloat16, torch.float32):
        defaults = tune.defaults(dtype, torch.device("cpu"))
        for quick in (False, True):
            runs = tune.candidates(dtype, quick)
            labels = [label for _, label, _, _ in runs]
            assert labels[:2] == [tune._label(defaults["forward"]),
                                  "dv " + tune._label(defaults["dv"])]
            assert len(set(labels)) == len(labels)
            gluon = [label for label in labels if label.startswith("warp-specialized")]
            if dtype == torch.float32:
                assert not gluon
            else:  # the default Gluon tiling first, then the row split, then the backward
                forward = [label for label in gluon if "backward" not in label]
                backward = [label for label in gluon if "backward" in label]
                assert len(forward) == (2 if quick else 3)
                assert len(backward) == (1 if quick else 3)
                assert gluon == labels[-len(gluon):] and gluon == forward + backward
                assert "split_rows=False" in gluon[0] and "split_rows=True" in gluon[1]
                # both kernels' defaults first, then dK/dQ at block_m 16, dV with 3 P^T slots
                assert "dkdq block_m=32" in backward[0] and "num_p=2" in backward[0]
                if not quick:
                    assert "dkdq block_m=16" in backward[1] and "num_p=3" in backward[2]


def test_only_keeps_the_candidates_whose_label_holds_a_text():
    pytest.importorskip("triton")
    import torch

    from tools.gpu_session import tune
    runs = tune.candidates(torch.bfloat16, False)
    wanted = "dkdq block_n=64,block_m=16,num_warps=4,num_stages=2,stream_keys=False"
    kept = tune.only_matching(runs, [wanted, "deterministic dq "])
    assert kept[0][1] == wanted and len(kept) > 1
    assert all(label == wanted or label.startswith("deterministic dq ")
               for _, label, _, _ in kept)
    assert tune.only_matching(runs, None) is runs
    with pytest.raises(SystemExit, match="--only matches no candidate"):
        tune.only_matching(runs, ["no such tiling"])
