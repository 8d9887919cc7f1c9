"""The Triton kernels compile for Hopper (sm_90) with the tilings stm_kernels launches first.

No GPU needed: Triton compiles to PTX and its bundled ptxas assembles it. This catches what the
CPU interpreter cannot (non-constexpr globals, shared memory over the 227 KiB limit, a lost
tensor-core path) before a GPU session does.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[1]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
H100_SHARED_MEMORY = 227 * 1024


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.parametrize("dtype, similarity", [("bf16", "dot"), ("bf16", "l2"), ("fp16", "dot"),
                                               ("fp32", "dot")])
def test_default_tilings_compile_for_sm90(dtype, similarity):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, "-m", "bench.kernel_resources", "--defaults", "--dtype", dtype,
         "--similarity", similarity], cwd=ROOT, env=environment, capture_output=True, text=True,
        timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(completed.stdout.strip().splitlines()[-1])
    assert {row["kernel"] for row in rows} == {"fwd", "bwd_dkv", "bwd_dq", "merge"}
    for row in rows:
        assert "error" not in row, row
        assert row["shared_bytes"] <= H100_SHARED_MEMORY, row
        if row["kernel"] != "merge":
            assert row["wgmma"] > 0, f"{row['kernel']} lost the Hopper tensor-core path: {row}"
