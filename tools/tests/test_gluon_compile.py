"""The warp-specialised Gluon kernels compiled for sm_90 without a GPU
(tools/kernel_report/gluon_compile.py). The forward: the PTX has TMA, mbarriers and wgmma, S is
computed by one partition only, ptxas reports no spills, shared memory fits 227 KiB. The dK/dQ
kernel: no spills, shared memory, TMA, and each MMA warpgroup's wgmma per query block. The dV
kernel: no spills, shared memory, TMA loads and stores, S^T once per query block."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from stm_kernels.experimental import gluon_backward, gluon_backward_dv, gluon_forward  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
H100_SHARED_MEMORY = 227 * 1024


VARIANTS = {"bf16-dot": dict(dtype="bf16", l2=False), "bf16-l2": dict(dtype="bf16", l2=True),
            "fp16-dot": dict(dtype="fp16", l2=False),
            # ROW_SPLIT_CONFIG: 128 query rows, the PV warpgroups splitting them, 2 value chunks
            "bf16-dot-rows": dict(dtype="bf16", l2=False, split_rows=True),
            "bf16-l2-rows": dict(dtype="bf16", l2=True, split_rows=True)}


# The warp-specialised dK/dQ kernel (stm_kernels/experimental/gluon_backward.py), at its
# default tiling.
BACKWARD_VARIANTS = {"bwd-bf16-dot": dict(dtype="bf16", l2=False, backward=True),
                     "bwd-bf16-l2": dict(dtype="bf16", l2=True, backward=True),
                     "bwd-fp16-dot": dict(dtype="fp16", l2=False, backward=True)}
# The warp-specialised dV kernel (stm_kernels/experimental/gluon_backward_dv.py): its default
# tiling, and the deeper P^T ring tune times.
DV_VARIANTS = {"dv-bf16-dot": dict(dtype="bf16", l2=False, dv={}),
               "dv-bf16-l2": dict(dtype="bf16", l2=True, dv={}),
               "dv-fp16-dot": dict(dtype="fp16", l2=False, dv={}),
               "dv-bf16-dot-p3": dict(dtype="bf16", l2=False, dv=dict(num_p=3))}


def _config(variant):
    return (gluon_forward.ROW_SPLIT_CONFIG if VARIANTS[variant].get("split_rows")
            else gluon_forward.WarpSpecializedConfig())

# Runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process; interpreted
# kernels cannot be compiled). Prints one JSON line: per variant the PTX facts and ptxas' report.
COMPILE_SCRIPT = r"""
import json, re, subprocess, sys, tempfile, os
from stm_kernels.experimental import gluon_forward as g
from stm_kernels.experimental import gluon_backward_dv as dv
from tools.kernel_report.gluon_compile import (compile_backward_dv_for_arch,
                                               compile_backward_for_arch, compile_for_arch)
ptxas, variants = sys.argv[1], json.loads(sys.argv[2])
report = {}
for name, kwargs in variants.items():
    if "dv" in kwargs:
        config = dv.WarpSpecializedDvConfig(**kwargs.pop("dv"))
        compiled = compile_backward_dv_for_arch(config=config, **kwargs)
    elif kwargs.pop("backward", False):
        compiled = compile_backward_for_arch(**kwargs)
    else:
        config = g.ROW_SPLIT_CONFIG if kwargs.pop("split_rows", False) else None
        compiled = compile_for_arch(config=config, **kwargs)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        open(path, "w").write(ptx)
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                             capture_output=True, text=True)
    log = run.stdout + run.stderr
    spills = re.search(r"(\d+) bytes spill stores", log)
    regs = re.search(r"Used (\d+) registers", log)
    report[name] = dict(
        ptxas_rc=run.returncode, ptxas_log=log[-2000:], shared=compiled.metadata.shared,
        spill_stores=int(spills.group(1)) if spills else None,
        registers=int(regs.group(1)) if regs else None,
        wgmma=re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx),
        tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        tma_store=len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx)),
        mbarrier_wait=len(re.findall(r"mbarrier\.try_wait", ptx)),
        mbarrier_arrive=len(re.findall(r"mbarrier\.arrive", ptx)),
        expect_tx=len(re.findall(r"mbarrier\.arrive\.expect_tx", ptx)),
        setmaxnreg=re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx),
        fence_proxy_async=len(re.findall(r"fence\.proxy\.async", ptx)),
        ttgir_warp_specialize="ttg.warp_specialize" in compiled.asm["ttgir"])
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def compile_report():
    if not gluon_forward.AVAILABLE:
        pytest.skip(f"Gluon unavailable: {gluon_forward.UNAVAILABLE_REASON}")
    if not PTXAS.exists():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, str(PTXAS),
         json.dumps({**VARIANTS, **BACKWARD_VARIANTS, **DV_VARIANTS})], cwd=ROOT,
        env=environment, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiles_for_sm90(compile_report, variant):
    row = compile_report[variant]
    assert row["ptxas_rc"] == 0, row["ptxas_log"]
    assert row["spill_stores"] == 0, row["ptxas_log"]
    assert 0 < row["shared"] <= H100_SHARED_MEMORY, row["shared"]
    assert row["ttgir_warp_specialize"]
    # TMA loads (Q, K, two V boxes) completing on mbarriers, waits and arrives.
    assert row["tma"] >= 4 and row["expect_tx"] >= 3, row
    assert row["mbarrier_wait"] >= 6 and row["mbarrier_arrive"] >= 6, row
    assert row["fence_proxy_async"] >= 1  # P written by threads, read by wgmma
    # Register reallocation: the PV and load partitions' budgets appear as setmaxnreg.
    config = _config(variant)
    assert str(config.pv_regs) in row["setmaxnreg"] and str(config.load_regs) in row["setmaxnreg"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_duplicated_mma(compile_report, variant):
    """S = Q K (m64n64k16: block_n = 64) is issued by one partition only: Ck/16 instructions
    per 64 query rows in the whole kernel; P V (m64n128k16) by the two PV partitions, each over
    its own channels (or its own rows with split_rows): 2 partitions x block_n/16 k-steps x
    256/128 column halves."""
    config = _config(variant)
    wgmma = compile_report[variant]["wgmma"]
    s_count = (config.block_m // 64) * (128 // 16)
    pv_count = 2 * (config.block_n // 16) * 2
    assert wgmma.count(f"m64n{config.block_n}k16") == s_count, wgmma
    assert wgmma.count("m64n128k16") == pv_count, wgmma
    assert len(wgmma) == s_count + pv_count, wgmma


@pytest.mark.parametrize("variant", sorted(BACKWARD_VARIANTS))
def test_backward_compiles_for_sm90(compile_report, variant):
    """The dK/dQ kernel: no spills (the K and V blocks' wgmma descriptors formed in the loop,
    see _opaque_zero), shared memory within 227 KiB, TMA loads of K, V, Q and dO completing on
    mbarriers, both MMA warpgroups' and the load warp's register budgets."""
    row = compile_report[variant]
    assert row["ptxas_rc"] == 0, row["ptxas_log"]
    assert row["spill_stores"] == 0, row["ptxas_log"]
    assert 0 < row["shared"] <= H100_SHARED_MEMORY, row["shared"]
    assert row["ttgir_warp_specialize"]
    assert row["tma"] >= 6 and row["expect_tx"] >= 3, row  # K, 2 V boxes, Q, 2 dO boxes
    assert row["fence_proxy_async"] >= 1  # dS^T written by threads, read by wgmma
    config = gluon_backward.WarpSpecializedBackwardConfig()
    assert str(config.mma_regs) in row["setmaxnreg"], row["setmaxnreg"]
    assert str(config.load_regs) in row["setmaxnreg"], row["setmaxnreg"]


@pytest.mark.parametrize("variant", sorted(BACKWARD_VARIANTS))
def test_backward_mma_per_query_block(compile_report, variant):
    """Each MMA warpgroup issues, per query block of 16: S^T (Ck/16 k-steps), dP^T (Cv/16),
    dQ^T (two M tiles of Ck over block_n/16 k-steps), all m64n16k16, and dK as one m64n128k16
    with dS^T from registers: nothing computed twice, nothing issued by the load warp."""
    config = gluon_backward.WarpSpecializedBackwardConfig()
    wgmma = compile_report[variant]["wgmma"]
    per_warpgroup = 128 // 16 + 512 // 16 + 2 * (config.block_n // 16)
    assert wgmma.count(f"m64n{config.block_m}k16") == 2 * per_warpgroup, wgmma
    assert wgmma.count("m64n128k16") == 2 * (config.block_m // 16), wgmma
    assert len(wgmma) == 2 * per_warpgroup + 2 * (config.block_m // 16), wgmma



@pytest.mark.parametrize("variant", sorted(DV_VARIANTS))
def test_dv_compiles_for_sm90(compile_report, variant):
    """The dV kernel: no spills (the accumulator stored through shared memory by TMA, not by
    per-element stores), shared memory within 227 KiB, TMA loads of K, Q and two dO boxes per
    stage completing on mbarriers and one TMA store per dV warpgroup, the dV warpgroups' and
    the load warp's register budgets."""
    row = compile_report[variant]
    assert row["ptxas_rc"] == 0, row["ptxas_log"]
    assert row["spill_stores"] == 0, row["ptxas_log"]
    assert 0 < row["shared"] <= H100_SHARED_MEMORY, row["shared"]
    assert row["ttgir_warp_specialize"]
    assert row["tma_store"] == 2, row
    assert row["tma"] - row["tma_store"] >= 4 and row["expect_tx"] >= 3, row
    assert row["fence_proxy_async"] >= 2  # P^T and the staged dV written by threads
    config = gluon_backward_dv.WarpSpecializedDvConfig()
    assert str(config.dv_regs) in row["setmaxnreg"], row["setmaxnreg"]
    assert str(config.load_regs) in row["setmaxnreg"], row["setmaxnreg"]


@pytest.mark.parametrize("variant", sorted(DV_VARIANTS))
def test_dv_mma_per_query_block(compile_report, variant):
    """S^T = K^T Q (m64n64k16, Ck/16 k-steps) is issued by the P^T warpgroup alone, once per
    query block; dV's product (m64n128k16: 256 channels in two halves, block_m/16 k-steps)
    by each dV warpgroup, twice in the code (the first block is peeled out of the loop)."""
    config = gluon_backward_dv.WarpSpecializedDvConfig()
    wgmma = compile_report[variant]["wgmma"]
    s_count = 128 // 16
    dv_count = 2 * 2 * (config.block_m // 16) * 2
    assert wgmma.count(f"m64n{config.block_m}k16") == s_count, wgmma
    assert wgmma.count("m64n128k16") == dv_count, wgmma
    assert len(wgmma) == s_count + dv_count, wgmma
