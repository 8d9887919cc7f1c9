"""Static work report of the memory-read kernels: compiled for a GPU without a GPU.

    python -m tools.kernel_report.report            # default configs, bf16 + fp32 (TF32), sm_90
    python -m tools.kernel_report.report --json           # print the report as JSON, write nothing
    python -m tools.kernel_report.report --sweep --dtype bf16   # resources of the tuning candidates

For every kernel at its default config and the target shape (B=1, HW=1,620, N=162,000,
Ck=128, Cv=512) it reports registers, spills, shared memory, blocks per SM, grid size and
waves on 132 SMs, the matrix instructions of the main loop (shape x count, from the PTX),
whether warpgroups duplicate a dot (from the TTGIR layouts), block barriers and exp2 per
iteration, executed vs useful multiply-adds per (query, memory) pair, and the L2 bytes per
pair (the tiles each main-loop iteration loads, and its atomics) with the L2 -> SM bandwidth
each speed target of issue #11 would need at them. Useful work is
Ck + Cv = 640 MACs per pair forward and 2.5x that backward (the benchmark's count, 2,240 in
all); executed work is what the loop's instructions issue, over all warps and value chunks.

Integer arguments are specialised the way the Triton JIT does at launch (multiples of 16 get
divisibility 16), for contiguous (B, C, N) tensors and a broadcast query, as the launchers
pass them. Writes bench/results/kernel_work_sm<arch>_<date>.json; `python -m bench.report`
renders its README table. Speed is not here: tools.gpu_session.tune and bench.kernel on a GPU.
"""
import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench import common
from tools.kernel_report import ptx as static_work
from stm_kernels.backends.triton import launch as launchers
from stm_kernels.backends.triton import tilings as triton_configs
from tools.kernel_report.signature import specialised_signature
from stm_kernels.backends.triton.kernels.backward import (
    memory_read_bwd_kernel_dkdq, memory_read_bwd_kernel_dq,
                                   memory_read_bwd_kernel_dv, memory_read_usage_kernel)
from stm_kernels.backends.triton.kernels.topk import memory_read_topk_kernel
from stm_kernels.backends.triton.kernels.forward import (memory_read_fwd_kernel,
                                                         memory_read_merge_kernel)

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TRITON_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
TARGET = dict(B=1, HW=1620, N=162000, Ck=128, Cv=512)
SELECT_TOP_K = 64  # the largest top-k the fused selection supports
H100_SMS = 132
# The static report's targets, executed / useful MACs per pair: forward, and forward + backward
# (tests/test_kernel_report.py holds every default config to them).
FORWARD_RATIO_TARGET = 1.2
TOTAL_RATIO_TARGET = 1.3
# Issue #11's speed targets on an H100 in bf16, as fractions of the same-run bf16 matmul rate
# (forward, forward + backward, the warp-specialised forward), and that rate as measured on
# the workplace's H100 (769-798 TFLOP/s; bench kernel measures it in every run). The report
# turns each kernel's L2 bytes per pair into the L2 -> SM bandwidth its target would need.
MATMUL_RATE = 800e12
FORWARD_RATE_TARGET = 0.55
TOTAL_RATE_TARGET = 0.40
WARP_SPECIALIZED_RATE_TARGET = 0.65
# The kernels of the backward under torch.use_deterministic_algorithms (opt-in; no target).
DETERMINISTIC_DKDQ = "bwd_dkdq (deterministic)"
DETERMINISTIC_DQ = "bwd_dq (deterministic)"


def l2_bandwidth_needed(bytes_per_pair, useful_macs_per_pair, rate_fraction):
    """Bytes per second the L2 must deliver for a kernel moving bytes_per_pair per (query,
    memory) pair to run at rate_fraction of MATMUL_RATE (2 FLOPs per useful MAC)."""
    pairs_per_second = rate_fraction * MATMUL_RATE / (2 * useful_macs_per_pair)
    return bytes_per_pair * pairs_per_second


def useful_macs_per_pair(Ck, Cv):
    """(forward, backward) multiply-adds per (query, memory) pair the benchmarks credit."""
    forward = Ck + Cv
    return forward, 2.5 * forward


# --------------------------------------------------------------------------- compiling


def compile_kernel(kernel, pointer_types, values, constexprs, num_warps, num_stages, arch):
    """Compile one specialisation for `arch`; return (ptx, ttgir, shared bytes)."""
    signature, constexprs, attrs = specialised_signature(kernel.arg_names, pointer_types, values,
                                                         constexprs)
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.asm["ptx"], compiled.asm["ttgir"], compiled.metadata.shared


def ptxas_resources(ptx, arch):
    """Registers and spill-store bytes per ptxas -v (the assembler Triton ships)."""
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "kernel.ptx")
        with open(path, "w") as file:
            file.write(ptx)
        log = subprocess.run([PTXAS, f"-arch=sm_{arch}{suffix}", "-v", path, "-o",
                              path + ".cubin"], capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return dict(registers=int(registers.group(1)) if registers else None,
                spill_store_bytes=int(spills.group(1)) if spills else 0,
                ptxas_warnings=sorted(set(re.findall(r"warning : (.*)", log))))


def loop_report(ptx, ttgir, num_warps):
    """What one iteration of the main loop issues, and the dots' duplication."""
    body = static_work.main_loop(ptx, static_work.inner_trip_counts(ttgir))
    census = static_work.mma_census(body)
    dots = static_work.loop_dots(ttgir)
    return dict(
        main_loop_mma=census,
        executed_macs_per_iteration=static_work.executed_macs(census, num_warps),
        dots=dots,
        duplicated_dots=sum(dot["duplication"] > 1 for dot in dots),
        barriers_per_iteration=static_work.count(body, "bar.sync", "barrier.sync"),
        exp2_per_iteration_per_thread=static_work.count(body, "ex2.approx"),
        exp2_while_mma_pending=static_work.exp2_while_mma_pending(body),
        cp_async_per_iteration=static_work.count(body, "cp.async.ca", "cp.async.cg"),
        tma_per_iteration=static_work.count(body, "cp.async.bulk.tensor"),
        atomics_per_iteration_per_thread=static_work.count(body, "red", "atom"),
        **_l2_per_iteration(ttgir),
    )


def _l2_per_iteration(ttgir):
    """The main loop's L2 bytes (static_work.loop_memory) as report fields."""
    memory = static_work.loop_memory(ttgir)
    return dict(l2_load_bytes_per_iteration=memory["load_bytes"],
                l2_atomic_bytes_per_iteration=memory["atomic_bytes"])


# --------------------------------------------------------------------------- kernel specs


def _alignment(*strides):
    align = 16
    while align > 1 and any(stride % align for stride in strides):
        align //= 2
    return align


def _int_arguments(B, HW, N, Ck, Cv, splits):
    """Integer arguments for contiguous STM tensors, as the launchers pass them: query-sized
    tensors padded to a multiple of 16 positions, memory batch and channel strides divided by
    their alignment (ALIGN_K, ALIGN_V)."""
    HWp = triton.cdiv(HW, 16) * 16
    align_k, align_v = _alignment(Ck * N, N), _alignment(Cv * N, N)
    return dict(
        ALIGN_K=align_k, ALIGN_V=align_v,
        stride_qb=0, stride_qc=HWp, stride_qm=1, stride_kb=Ck * N // align_k,
        stride_kc=N // align_k, stride_kn=1,
        stride_vb=Cv * N // align_v, stride_vc=N // align_v, stride_vn=1, stride_sqb=N,
        stride_os=B * Cv * HW, stride_ob=Cv * HW, stride_oc=HW, stride_om=1,
        stride_ls=B * HW, stride_lb=HW, stride_lm=1,
        stride_dob=Cv * HWp, stride_doc=HWp, stride_dom=1,
        stride_dkb=Ck * N, stride_dkc=N, stride_dkn=1,
        stride_dvb=Cv * N, stride_dvc=N, stride_dvn=1, stride_dqb=0,
        stride_pos=splits * B * Cv * HW, stride_pob=Cv * HW, stride_poc=HW, stride_pom=1,
        stride_pls=B * HW, stride_plb=HW, stride_plm=1,
        HW=HW, N=N, CK=Ck, CV=Cv, SPLITS=splits)


def kernel_specs(dtype_name, similarity, forward, backward, shape=TARGET, sm_count=H100_SMS):
    """One dict per kernel for the given configs: name, kernel, types (pointer types),
    constexprs, values (integer arguments), num_warps, num_stages, grid, config, useful, and
    tile_pairs and repeats: one main-loop iteration's MACs x repeats / tile_pairs is the
    executed MACs per pair."""
    B, HW, N, Ck, Cv = (shape[key] for key in ("B", "HW", "N", "Ck", "Cv"))
    dtype = TRITON_TYPES[dtype_name]
    plan = launchers.forward_plan(forward, B, HW, N, Cv, sm_count)
    bplan = launchers.backward_plan(backward, B, N, Cv)
    values = _int_arguments(B, HW, N, Ck, Cv, plan.splits)
    values["n_per_split"] = plan.per_split
    common_constexprs = dict(L2=similarity == "l2", BLOCK_CK=max(16, triton.next_power_of_2(Ck)),
                             UPCAST=False, I64=False, PRECISION="tf32", RAGGED=False,
                             ALIGN_K=values["ALIGN_K"], ALIGN_V=values["ALIGN_V"])
    out_type = "*fp32" if plan.splits > 1 else dtype
    specs = [
        dict(name="fwd", kernel=memory_read_fwd_kernel,
             types=dict(q=dtype, k=dtype, ksq="*fp32", v=dtype, o=out_type, lse="*fp32",
                        lengths="*i32", qk_scale="fp32"),
             constexprs=dict(common_constexprs, BLOCK_M=forward.block_m, BLOCK_N=forward.block_n,
                             BLOCK_V=plan.block_v, NUM_V=plan.num_v),
             num_warps=forward.num_warps, num_stages=forward.num_stages,
             tile_pairs=forward.block_m * forward.block_n, repeats=plan.num_v,
             grid=plan.grid(B), config=_fields(forward), useful=useful_macs_per_pair(Ck, Cv)[0]),
        dict(name="bwd_dv", kernel=memory_read_bwd_kernel_dv,
             types=dict(q=dtype, k=dtype, do=dtype, lse="*fp32", dv=dtype, lengths="*i32",
                        qk_scale="fp32"),
             constexprs=dict(_without(common_constexprs, "ALIGN_V"), BLOCK_M=backward.dv.block_m,
                             BLOCK_N=backward.dv.block_n, BLOCK_V=bplan["dv_block_v"],
                             NUM_V=bplan["dv_num_v"]),
             num_warps=backward.dv.num_warps, num_stages=backward.dv.num_stages,
             tile_pairs=backward.dv.block_m * backward.dv.block_n, repeats=bplan["dv_num_v"],
             grid=bplan["dv_grid"], config=_fields(backward.dv), useful=None),
        dict(name="bwd_dkdq", kernel=memory_read_bwd_kernel_dkdq,
             types=dict(q=dtype, k=dtype, v=dtype, do=dtype, lse="*fp32", delta="*fp32",
                        dk=dtype, dq="*fp32", lengths="*i32", qk_scale="fp32", scale="fp32"),
             constexprs=dict(common_constexprs, BLOCK_M=backward.dkdq.block_m,
                             BLOCK_N=backward.dkdq.block_n, BLOCK_CV=bplan["dkdq_block_cv"],
                             NUM_CV=bplan["dkdq_num_cv"], ATOMIC_DQ=True),
             num_warps=backward.dkdq.num_warps, num_stages=backward.dkdq.num_stages,
             tile_pairs=backward.dkdq.block_m * backward.dkdq.block_n, repeats=1,
             grid=bplan["dkdq_grid"], config=_fields(backward.dkdq), useful=None),
    ]
    # Deterministic mode: dK/dQ without its dQ atomics (the dQ dot drops out), plus bwd_dq.
    dq = launchers.dq_plan(backward.dq, B, HW, N, Cv, sm_count)
    specs += [
        dict(specs[-1], name=DETERMINISTIC_DKDQ,
             constexprs=dict(specs[-1]["constexprs"], ATOMIC_DQ=False)),
        dict(name=DETERMINISTIC_DQ, kernel=memory_read_bwd_kernel_dq,
             types=dict(q=dtype, k=dtype, ksq="*fp32", v=dtype, do=dtype, lse="*fp32",
                        delta="*fp32", dq_parts="*fp32", lengths="*i32", qk_scale="fp32"),
             constexprs=dict(common_constexprs, BLOCK_M=backward.dq.block_m,
                             BLOCK_N=backward.dq.block_n, BLOCK_CV=dq["block_cv"],
                             NUM_CV=dq["num_cv"]),
             num_warps=backward.dq.num_warps, num_stages=backward.dq.num_stages,
             tile_pairs=backward.dq.block_m * backward.dq.block_n, repeats=1, grid=dq["grid"],
             config=_fields(backward.dq), useful=None,
             values_extra=dict(n_per_split=dq["per_split"], stride_pds=B * Ck * HW,
                               stride_pdb=Ck * HW, stride_pdc=HW, stride_pdm=1)),
    ]
    select_m, select_n, select_k, select_warps, select_stages = launchers.select_launch(
        SELECT_TOP_K)
    select_plan = launchers.forward_plan(triton_configs.ForwardConfig(
        block_m=select_m, block_n=select_n), B, HW, N, 16, sm_count)
    usage = triton_configs.USAGE_CONFIG[False]
    specs += [
        dict(name=f"select (top-{SELECT_TOP_K})", kernel=memory_read_topk_kernel,
             types=dict(q=dtype, k=dtype, ksq="*fp32", lengths="*i32", keys="*i64",
                        qk_scale="fp32"),
             constexprs=dict(_without(common_constexprs, "ALIGN_V"), BLOCK_M=select_m,
                             BLOCK_N=select_n, TOP_K=select_k),
             num_warps=select_warps, num_stages=select_stages,
             tile_pairs=select_m * select_n, repeats=1, grid=select_plan.grid(B),
             config=dict(block_m=select_m, block_n=select_n, top_k=select_k), useful=None,
             values_extra=dict(n_per_split=select_plan.per_split, stride_ks=B * HW * select_k,
                               stride_kyb=HW * select_k, stride_km=select_k)),
        dict(name="usage", kernel=memory_read_usage_kernel,
             types=dict(q=dtype, k=dtype, lse="*fp32", lengths="*i32", usage="*fp32",
                        qk_scale="fp32"),
             constexprs=dict(_without(common_constexprs, "ALIGN_V"), BLOCK_M=usage["block_m"],
                             BLOCK_N=usage["block_n"]),
             num_warps=usage["num_warps"], num_stages=2,
             tile_pairs=usage["block_m"] * usage["block_n"], repeats=1,
             grid=(triton.cdiv(N, usage["block_n"]), B),
             config=dict(block_n=usage["block_n"], block_m=usage["block_m"]), useful=None,
             values_extra=dict(stride_ub=N)),
    ]
    if plan.splits > 1:
        merge_v = min(plan.block_v, 64)
        specs.append(dict(
            name="merge", kernel=memory_read_merge_kernel,
            types=dict(po="*fp32", plse="*fp32", o=dtype, lse="*fp32"),
            constexprs=dict(BLOCK_M=64, BLOCK_V=merge_v, I64=False), num_warps=4, num_stages=3,
            tile_pairs=None, repeats=0,
            grid=(triton.cdiv(HW, 64), triton.cdiv(Cv, merge_v), B),
            config=dict(block_m=64, block_v=merge_v), useful=None))
    for spec in specs:
        spec["values"] = dict(values, **spec.pop("values_extra", {}))
    return specs


def _without(mapping, *keys):
    return {key: value for key, value in mapping.items() if key not in keys}


def _fields(config):
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def analyse(spec, arch=90, sm_count=H100_SMS):
    """Compile one spec and return its report row (an 'error' row if it does not compile)."""
    row = dict(kernel=spec["name"], config=spec["config"], num_warps=spec["num_warps"],
               num_stages=spec["num_stages"], grid=list(spec["grid"]))
    try:
        ptx, ttgir, shared = compile_kernel(spec["kernel"], spec["types"], spec["values"],
                                            spec["constexprs"], spec["num_warps"],
                                            spec["num_stages"], arch)
    except Exception as error:  # a config that does not compile is a result, not a crash
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
        return row
    row.update(shared_bytes=shared, **ptxas_resources(ptx, arch))
    row["wgmma"] = ptx.count("wgmma.mma_async")
    row["blocks_per_sm"] = static_work.blocks_per_sm(row["registers"], shared, spec["num_warps"])
    blocks = 1
    for size in spec["grid"]:
        blocks *= size
    row["blocks"] = blocks
    row["waves"] = round(blocks / (sm_count * max(row["blocks_per_sm"], 1)), 2)
    row.update(loop_report(ptx, ttgir, spec["num_warps"]))
    if spec["tile_pairs"]:
        executed = row["executed_macs_per_iteration"] * spec["repeats"] / spec["tile_pairs"]
        from_dots = sum(dot["executed_macs"] for dot in row["dots"]) * spec["repeats"]
        useful = sum(dot["useful_macs"] for dot in row["dots"]) * spec["repeats"]
        row["executed_macs_per_pair"] = executed
        # The same from the TTGIR's dots and layouts: a check of the PTX reading.
        row["executed_macs_per_pair_from_dots"] = from_dots / spec["tile_pairs"]
        row["dot_macs_per_pair"] = useful / spec["tile_pairs"]
        _add_l2_per_pair(row, spec["repeats"], spec["tile_pairs"])
    return row


def _add_l2_per_pair(row, repeats, tile_pairs):
    """Global-memory bytes per (query, memory) pair: what one main-loop iteration asks of the
    L2, over the pairs it covers (value chunks repeat the loop, as for the MACs)."""
    for kind in ("load", "atomic"):
        row[f"l2_{kind}_bytes_per_pair"] = (
            row[f"l2_{kind}_bytes_per_iteration"] * repeats / tile_pairs)


WARP_SPECIALIZED = "fwd_ws (opt-in)"
WARP_SPECIALIZED_ROWS = "fwd_ws rows (opt-in)"


def analyse_warp_specialized(dtype_name, similarity="dot", arch=90, shape=TARGET,
                             sm_count=H100_SMS, config=None, name=WARP_SPECIALIZED):
    """Report row of the opt-in warp-specialised Gluon forward
    (stm_kernels.experimental.gluon_forward)
    at a WarpSpecializedConfig (default: its default). Its partitions run different loops, so
    executed work comes from the TTGIR's dots (each issued by its own partition's warpgroup)
    and the PTX census covers the whole kernel; value chunks repeat the work per pair."""
    from stm_kernels.experimental import gluon_forward as gluon
    config = config or gluon.WarpSpecializedConfig()
    B, HW, N = shape["B"], shape["HW"], shape["N"]
    splits, _ = gluon.default_splits(HW, N, B, config, sm_count)
    row = dict(kernel=name, config=_fields(config), num_warps=13, num_stages=None,
               grid=[triton.cdiv(HW, config.block_m) * config.value_chunks, B, splits])
    if not gluon.AVAILABLE:
        row["error"] = gluon.UNAVAILABLE_REASON
        return row
    if dtype_name not in ("bf16", "fp16"):
        row["error"] = "bf16/fp16 only (fp32 runs the plain kernel)"
        return row
    try:
        from tools.kernel_report.gluon_compile import compile_for_arch
        compiled = compile_for_arch(dtype=dtype_name, l2=similarity == "l2", arch=arch,
                                    config=config, HW=HW, N=N, Ck=shape["Ck"], Cv=shape["Cv"],
                                    B=B)
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
        return row
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    row.update(shared_bytes=compiled.metadata.shared, **ptxas_resources(ptx, arch))
    row["wgmma"] = ptx.count("wgmma.mma_async")
    # 13 warps padded to 16 (512 threads) per block.
    row["blocks_per_sm"] = static_work.blocks_per_sm(row["registers"], row["shared_bytes"], 16)
    row["blocks"] = row["grid"][0] * row["grid"][1] * row["grid"][2]
    row["waves"] = round(row["blocks"] / (sm_count * max(row["blocks_per_sm"], 1)), 2)
    dots = static_work.loop_dots(ttgir)
    tile_pairs = config.block_m * config.block_n / config.value_chunks
    row.update(
        main_loop_mma=static_work.mma_census(ptx.splitlines()), dots=dots,
        duplicated_dots=sum(dot["duplication"] > 1 for dot in dots),
        barriers_per_iteration=None, exp2_per_iteration_per_thread=None,
        tma_in_kernel=static_work.count(ptx.splitlines(), "cp.async.bulk.tensor"),
        mbarrier_waits_in_kernel=static_work.count(ptx.splitlines(), "mbarrier.try_wait"),
        executed_macs_per_pair=sum(dot["executed_macs"] for dot in dots) / tile_pairs,
        executed_macs_per_pair_from_dots=sum(dot["executed_macs"] for dot in dots) / tile_pairs,
        dot_macs_per_pair=sum(dot["useful_macs"] for dot in dots) / tile_pairs)
    row.update(_l2_per_iteration(ttgir))  # the load partition's TMA boxes per key block
    _add_l2_per_pair(row, 1, tile_pairs)
    return row


def report(dtype_name, similarity="dot", arch=90, forward=None, backward=None, shape=TARGET):
    """Rows of every kernel at the given (default: first GPU candidate) configs, and totals."""
    default_forward, default_backward = triton_configs.defaults(ITEMSIZE[dtype_name])
    specs = kernel_specs(dtype_name, similarity, forward or default_forward,
                         backward or default_backward, shape)
    rows = [analyse(spec, arch) for spec in specs]
    if dtype_name != "fp32":
        rows.append(analyse_warp_specialized(dtype_name, similarity, arch, shape))
        rows.append(analyse_warp_specialized(dtype_name, similarity, arch, shape,
                                             config=triton_configs.ROW_SPLIT_CONFIG,
                                             name=WARP_SPECIALIZED_ROWS))
    useful_forward, useful_backward = useful_macs_per_pair(shape["Ck"], shape["Cv"])
    per_pair = {row["kernel"]: row.get("executed_macs_per_pair") for row in rows}
    totals = dict(useful_forward=useful_forward, useful_backward=useful_backward)
    if None not in (per_pair.get("fwd"), per_pair.get("bwd_dv"), per_pair.get("bwd_dkdq")):
        backward_executed = per_pair["bwd_dv"] + per_pair["bwd_dkdq"]
        totals.update(
            executed_forward=per_pair["fwd"], executed_backward=backward_executed,
            forward_ratio=round(per_pair["fwd"] / useful_forward, 3),
            backward_ratio=round(backward_executed / useful_backward, 3),
            total_ratio=round((per_pair["fwd"] + backward_executed)
                              / (useful_forward + useful_backward), 3))
    deterministic = (per_pair.get("bwd_dv"), per_pair.get(DETERMINISTIC_DKDQ),
                     per_pair.get(DETERMINISTIC_DQ))
    if None not in deterministic:
        totals["deterministic_backward_ratio"] = round(sum(deterministic) / useful_backward, 3)
    for name, key in ((WARP_SPECIALIZED, "warp_specialized_forward_ratio"),
                      (WARP_SPECIALIZED_ROWS, "warp_specialized_rows_forward_ratio")):
        if per_pair.get(name) is not None:
            totals[key] = round(per_pair[name] / useful_forward, 3)
    totals.update(_l2_totals(rows, useful_forward, useful_backward, dtype_name))
    return dict(dtype=dtype_name, similarity=similarity, arch=f"sm_{arch}", shape=dict(shape),
                rows=rows, totals=totals)


def _l2_totals(rows, useful_forward, useful_backward, dtype_name):
    """L2 bytes per pair of the forward, the backward (loads and dQ atomics) and the
    warp-specialised forward; for 16-bit inputs also the L2 bandwidth (TB/s) each would need
    at its bf16 rate target."""
    by_kernel = {row["kernel"]: row for row in rows if "l2_load_bytes_per_pair" in row}

    def bytes_of(*names):
        if not all(name in by_kernel for name in names):
            return None
        return sum(by_kernel[name]["l2_load_bytes_per_pair"]
                   + by_kernel[name]["l2_atomic_bytes_per_pair"] for name in names)

    forward, backward = bytes_of("fwd"), bytes_of("bwd_dv", "bwd_dkdq")
    totals = {}
    sixteen_bit = ITEMSIZE[dtype_name] == 2
    if forward is not None and backward is not None:
        totals.update(l2_bytes_per_pair_forward=forward, l2_bytes_per_pair_backward=backward)
        if sixteen_bit:
            totals.update(
                l2_tbps_forward_at_target=round(l2_bandwidth_needed(
                    forward, useful_forward, FORWARD_RATE_TARGET) / 1e12, 2),
                l2_tbps_total_at_target=round(l2_bandwidth_needed(
                    forward + backward, useful_forward + useful_backward,
                    TOTAL_RATE_TARGET) / 1e12, 2))
    for name, suffix in ((WARP_SPECIALIZED, "warp_specialized"),
                         (WARP_SPECIALIZED_ROWS, "warp_specialized_rows")):
        ws = bytes_of(name)
        if ws is None:
            continue
        totals[f"l2_bytes_per_pair_{suffix}"] = ws
        if sixteen_bit:
            totals[f"l2_tbps_{suffix}_at_target"] = round(l2_bandwidth_needed(
                ws, useful_forward, WARP_SPECIALIZED_RATE_TARGET) / 1e12, 2)
    return totals


# --------------------------------------------------------------------------- sweep


FORWARD_SWEEP = [
    triton_configs.ForwardConfig(block_m=m, block_n=n, block_v=v, num_warps=w, num_stages=s)
    for m, n, v, w, s in [(64, 32, 512, 8, 3), (128, 64, 256, 8, 3), (128, 64, 256, 8, 2),
                          (128, 32, 256, 8, 3), (128, 32, 256, 8, 2), (128, 64, 128, 8, 3),
                          (128, 32, 128, 8, 3), (64, 64, 256, 4, 2), (64, 32, 256, 4, 3)]]
DV_SWEEP = [
    triton_configs.DvConfig(block_n=n, block_m=m, block_v=v, num_warps=w, num_stages=s)
    for n, m, v, w, s in [(128, 64, 256, 8, 2), (128, 64, 256, 8, 1), (128, 32, 256, 8, 2),
                          (128, 64, 128, 8, 2), (128, 32, 128, 8, 2), (64, 64, 256, 4, 2),
                          (64, 64, 128, 4, 2), (64, 32, 128, 4, 1), (64, 32, 256, 4, 1)]]
DKDQ_SWEEP = [
    triton_configs.DkdqConfig(block_n=n, block_m=m, num_warps=w, num_stages=s, block_cv=cv)
    for n, m, w, s, cv in [(128, 32, 8, 1, None), (128, 16, 8, 2, None), (128, 16, 8, 1, None),
                           (128, 32, 8, 2, 128), (128, 32, 8, 2, 64), (128, 64, 8, 2, 64),
                           (64, 32, 4, 2, 128), (64, 16, 4, 1, None), (64, 32, 4, 2, 64),
                           (64, 64, 4, 2, 64)]]

# The deterministic dQ kernel per element size, spill-free at the target (dot and L2); 128 keys
# per block (re-reading dO half as often as 64) spill 4 B in bf16 even with 32-channel chunks.
DQ_SWEEP = {
    size: [triton_configs.DqConfig(block_m=m, block_n=n, block_cv=cv, num_warps=w, num_stages=s)
           for m, n, cv, w, s in table]
    for size, table in {2: [(128, 64, 64, 8, 2), (128, 64, 32, 8, 2), (128, 32, 64, 8, 3)],
                        4: [(128, 32, 32, 8, 2), (64, 32, 32, 4, 1)]}.items()}


def sweep(dtype_name, similarity="dot", arch=90):
    """Resource rows of every tuning candidate (forward, dV, dK/dQ and the deterministic dQ
    kernel separately, the others at their defaults)."""
    default_forward, default_backward = triton_configs.defaults(ITEMSIZE[dtype_name])
    rows = []
    for forward in FORWARD_SWEEP:
        spec = kernel_specs(dtype_name, similarity, forward, default_backward)[0]
        rows.append(analyse(spec, arch))
    for field, candidates, name in (("dv", DV_SWEEP, "bwd_dv"), ("dkdq", DKDQ_SWEEP, "bwd_dkdq"),
                                    ("dq", DQ_SWEEP[ITEMSIZE[dtype_name]], DETERMINISTIC_DQ)):
        for config in candidates:
            backward = dataclasses.replace(default_backward, **{field: config})
            specs = kernel_specs(dtype_name, similarity, default_forward, backward)
            rows.append(analyse(next(spec for spec in specs if spec["name"] == name), arch))
    return rows


# --------------------------------------------------------------------------- output


def _mma_text(row):
    return " + ".join(f"{entry['count']}x {entry['shape']}" for entry in row["main_loop_mma"])


def _or_dash(value):
    return "-" if value is None else value


def table(rows):
    """Markdown table of report rows."""
    lines = ["| kernel | config | regs | spill B | smem KiB | blocks/SM | grid | waves | "
             "main-loop MMA (per warpgroup; fwd_ws: whole kernel) | dup. dots | "
             "barriers/iter | exp2/iter | "
             "MACs/pair executed | MACs/pair in dots | L2 B/pair |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        config = ",".join(f"{key}={value}" for key, value in row["config"].items()
                          if value not in (None, False))
        if "error" in row:
            lines.append(f"| {row['kernel']} | {config} | {row['error']} |" + " |" * 12)
            continue
        grid = "x".join(map(str, row["grid"]))
        pair = row.get("executed_macs_per_pair")
        dots = row.get("dot_macs_per_pair")
        lines.append(
            f"| {row['kernel']} | {config} | {row['registers']} | {row['spill_store_bytes']} | "
            f"{row['shared_bytes'] / 1024:.1f} | {row['blocks_per_sm']} | {grid} | "
            f"{row['waves']} | {_mma_text(row) or '-'} | {row['duplicated_dots']} | "
            f"{_or_dash(row['barriers_per_iteration'])} | "
            f"{_or_dash(row['exp2_per_iteration_per_thread'])} | "
            f"{'-' if pair is None else f'{pair:.0f}'} | "
            f"{'-' if dots is None else f'{dots:.0f}'} | {_l2_text(row)} |")
    return "\n".join(lines)


def _l2_text(row):
    load, atomic = row.get("l2_load_bytes_per_pair"), row.get("l2_atomic_bytes_per_pair")
    if load is None:
        return "-"
    return f"{load:.3g}" + (f" + {atomic:.3g} atomic" if atomic else "")


def summary(payload):
    """README table: one block per dtype, then the executed/useful ratios against targets."""
    parts = []
    for entry in payload["reports"]:
        totals = entry["totals"]
        parts.append(f"**{entry['dtype']}{' (TF32)' if entry['dtype'] == 'fp32' else ''}, "
                     f"{entry['similarity']}**\n\n{table(entry['rows'])}\n")
        if "forward_ratio" in totals:
            parts.append(
                f"Executed / useful MACs per pair: forward {totals['executed_forward']:.0f} / "
                f"{totals['useful_forward']:.0f} = **{totals['forward_ratio']:.2f}** (target "
                f"<= {FORWARD_RATIO_TARGET}); backward {totals['executed_backward']:.0f} / "
                f"{totals['useful_backward']:.0f} = {totals['backward_ratio']:.2f}; forward + "
                f"backward **{totals['total_ratio']:.2f}** (target <= {TOTAL_RATIO_TARGET})"
                + (f"; warp-specialised forward (opt-in) "
                   f"{totals['warp_specialized_forward_ratio']:.2f}"
                   if "warp_specialized_forward_ratio" in totals else "")
                + (f", with split rows {totals['warp_specialized_rows_forward_ratio']:.2f}"
                   if "warp_specialized_rows_forward_ratio" in totals else "")
                + (f"; deterministic backward (opt-in, no target) "
                   f"{totals['deterministic_backward_ratio']:.2f}"
                   if "deterministic_backward_ratio" in totals else "") + ".\n")
        if "l2_tbps_forward_at_target" in totals:
            parts.append(_l2_sentence(totals))
    return "\n".join(parts)


def _l2_sentence(totals):
    """The L2 traffic per pair and the L2 -> SM bandwidth the rate targets would need."""
    rate = f"{MATMUL_RATE / 1e12:.0f} TFLOP/s"
    text = (f"L2 -> SM bytes per pair: forward {totals['l2_bytes_per_pair_forward']:.3g}, "
            f"backward {totals['l2_bytes_per_pair_backward']:.3g} (loads and dQ atomics); "
            f"at the targets ({FORWARD_RATE_TARGET:.0%} / {TOTAL_RATE_TARGET:.0%} of {rate}) "
            f"the L2 would have to deliver **{totals['l2_tbps_forward_at_target']} TB/s** "
            f"(forward) and **{totals['l2_tbps_total_at_target']} TB/s** (forward + backward)")
    if "l2_tbps_warp_specialized_at_target" in totals:
        text += (f"; the warp-specialised forward moves "
                 f"{totals['l2_bytes_per_pair_warp_specialized']:.3g} B per pair (64 query rows "
                 f"share a K/V tile, against 128 in the plain kernel): "
                 f"**{totals['l2_tbps_warp_specialized_at_target']} TB/s** at "
                 f"{WARP_SPECIALIZED_RATE_TARGET:.0%}")
    if "l2_tbps_warp_specialized_rows_at_target" in totals:
        text += (f"; with split rows (128 query rows per K/V tile, 2 value chunks) "
                 f"{totals['l2_bytes_per_pair_warp_specialized_rows']:.3g} B per pair: "
                 f"**{totals['l2_tbps_warp_specialized_rows_at_target']} TB/s** at "
                 f"{WARP_SPECIALIZED_RATE_TARGET:.0%}")
    return text + ". Estimates from the tile shapes, not measurements.\n"


def main(argv=None):
    """`python -m tools.kernel_report.report`; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"],
                        choices=sorted(TRITON_TYPES))
    parser.add_argument("--similarity", nargs="+", default=["dot"], choices=["dot", "l2"])
    parser.add_argument("--json", action="store_true", help="print JSON only, write nothing")
    parser.add_argument("--sweep", action="store_true",
                        help="resources of the tuning candidates instead of the defaults")
    args = parser.parse_args(argv)
    if triton_configs.INTERPRETING:
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    reports = []
    for dtype in args.dtype:
        for similarity in args.similarity:
            if args.sweep:
                rows = sweep(dtype, similarity, args.arch)
                reports.append(dict(dtype=dtype, similarity=similarity, rows=rows, totals={}))
            else:
                reports.append(report(dtype, similarity, args.arch))
    payload = dict(benchmark="kernel_work" if not args.sweep else "kernel_sweep",
                   device=f"sm_{args.arch} compiled offline (no GPU; not run)",
                   device_type=f"sm{args.arch}", torch=_torch_version(),
                   triton=triton.__version__, commit=common.git_commit(),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"),
                   shape=TARGET, sm_count=H100_SMS,
                   reports=reports)
    if args.json:
        print(json.dumps(payload))
        return 0
    if args.sweep:  # a sweep is read off the terminal, not kept
        print(summary(payload))
    else:
        common.finish_run("kernel_work", payload, None, summary)
    return 0


def _torch_version():
    import torch
    return torch.__version__


if __name__ == "__main__":
    raise SystemExit(main())
