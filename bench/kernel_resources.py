"""Compile the memory-read kernels for a GPU architecture without a GPU and report their
resources: shared memory, registers, spills, and which instructions they use (wgmma, cp.async).

    python -m bench.kernel_resources                      # sweep the candidate tilings, sm_90
    python -m bench.kernel_resources --dtype fp32 --arch 80

Spills and a missing wgmma/cp.async are visible here long before a GPU is at hand; speed is not
(use bench.memory_read on the device for that). Integer arguments are specialised the way the
Triton JIT does at launch (value 1 -> constant, multiples of 16 -> divisibility 16), for the
STM shapes given on the command line (contiguous (B, C, N) layouts, a broadcast query).
Writes bench/results/kernel_resources_sm<arch>_<dtype>_<date>.json.
"""
import argparse
import datetime
import json
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.common import RESULTS

from stm_kernels import memory_read_triton as kernels

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TRITON_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _alignment(*strides):
    align = 16
    while align > 1 and any(stride % align for stride in strides):
        align //= 2
    return align


def strides(B, HW, N, Ck, Cv, splits):
    """Integer arguments of the kernels for contiguous STM tensors, as the launchers pass them:
    query-sized tensors padded to a multiple of 16 positions, memory batch and channel strides
    divided by their alignment (ALIGN_K, ALIGN_V)."""
    HWp = triton.cdiv(HW, 16) * 16
    align_k, align_v = _alignment(Ck * N, N), _alignment(Cv * N, N)
    return dict(
        ALIGN_K=align_k, ALIGN_V=align_v,
        stride_qb=0, stride_qc=HWp, stride_qm=1, stride_kb=Ck * N // align_k,
        stride_kc=N // align_k, stride_kn=1,
        stride_vb=Cv * N // align_v, stride_vc=N // align_v, stride_vn=1,
        stride_os=B * Cv * HW, stride_ob=Cv * HW, stride_oc=HW, stride_om=1,
        stride_ls=B * HW, stride_lb=HW, stride_lm=1,
        stride_dob=Cv * HWp, stride_doc=HWp, stride_dom=1,
        stride_dks=B * Ck * N, stride_dkb=Ck * N, stride_dkc=N, stride_dkn=1,
        stride_dvb=Cv * N, stride_dvc=N, stride_dvn=1,
        stride_dqs=B * Ck * HW, stride_dqb=Ck * HW, stride_dqc=HW, stride_dqm=1,
        HW=HW, N=N, CK=Ck, CV=Cv, n_per_split=triton.cdiv(triton.cdiv(N, splits), 128) * 128)


def compile_report(kernel, pointer_types, values, constexprs, num_warps, num_stages, arch):
    """Compile one specialisation; return its resource summary."""
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            if pointer_types[name].startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif values[name] == 1:
            constexprs[name] = 1
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    suffix = "a" if arch >= 90 else ""
    path = f"/tmp/stm_kernel_resources_{os.getpid()}.ptx"
    with open(path, "w") as file:
        file.write(ptx)
    log = subprocess.run([PTXAS, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", path + ".cubin"],
                         capture_output=True, text=True).stderr
    spills = re.search(r"(\d+) bytes spill stores", log)
    return dict(shared_bytes=compiled.metadata.shared,
                registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                spill_store_bytes=int(spills.group(1)) if spills else 0,
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                cp_async=len(re.findall(r"cp\.async\.c[ag]", ptx)))


def default_tilings(dtype_name):
    """The first candidate tilings stm_kernels launches on a GPU for this dtype, in sweep form."""
    size = 4 if dtype_name == "fp32" else 2
    forward = kernels._GPU_FORWARD[size][0]
    backward = kernels._GPU_BACKWARD[size][0]
    return ([(forward.block_m, forward.block_n, forward.block_v, forward.num_warps,
              forward.num_stages)],
            [(backward.dkv_block_m, backward.dkv_block_n, backward.dkv_block_v,
              backward.dkv_warps, backward.dkv_stages)],
            [(backward.dq_block_m, backward.dq_block_n, backward.dq_warps, backward.dq_stages)])


def sweep(args):
    forward_sweep, dkv_sweep, dq_sweep = (default_tilings(args.dtype) if args.defaults else
                                          (args.forward or FORWARD_SWEEP, DKV_SWEEP, DQ_SWEEP))
    dtype = TRITON_TYPES[args.dtype]
    values = strides(args.batch, args.hw, args.n, args.ck, args.cv, args.splits)
    block_ck = max(16, triton.next_power_of_2(args.ck))
    block_cv = max(16, triton.next_power_of_2(args.cv))
    common = dict(L2=args.similarity == "l2", BLOCK_CK=block_ck, UPCAST=False, I64=False,
                  PRECISION="tf32", ALIGN_K=values.pop("ALIGN_K"), ALIGN_V=values.pop("ALIGN_V"))
    rows = []

    def add(name, kernel, types, block_m, block_n, block_v, warps, stages, **extra):
        constexprs = dict(common, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_V=block_v, **extra)
        rows.append(dict(kernel=name, block_m=block_m, block_n=block_n, block_v=block_v,
                         num_warps=warps, num_stages=stages,
                         **_safe(kernel, types, values, constexprs, warps, stages, args.arch)))

    forward_types = dict(q=dtype, k=dtype, v=dtype, o="*fp32", lse="*fp32", qk_scale="fp32")
    backward_types = dict(q=dtype, k=dtype, v=dtype, do=dtype, lse="*fp32", delta="*fp32",
                          dk=dtype, dv=dtype, dq="*fp32", qk_scale="fp32", scale="fp32")
    for name, kernel, types, tilings in (
            ("fwd", kernels.memory_read_fwd_kernel, forward_types, forward_sweep),
            ("bwd_dkv", kernels.memory_read_bwd_kernel_dkv, backward_types, dkv_sweep)):
        for block_m, block_n, block_v, warps, stages in tilings:
            block_v = min(block_v, block_cv)
            add(name, kernel, types, block_m, block_n, block_v, warps, stages,
                NUM_V=triton.cdiv(args.cv, block_v))
    for block_m, block_n, warps, stages in dq_sweep:
        add("bwd_dq", kernels.memory_read_bwd_kernel_dq, backward_types, block_m, block_n,
            block_cv, warps, stages)
    merge_types = dict(po="*fp32", plse="*fp32", o=dtype, lse="*fp32")
    merge_values = dict(stride_pos=args.batch * args.cv * args.hw, stride_pob=args.cv * args.hw,
                        stride_poc=args.hw, stride_pom=1, stride_pls=args.batch * args.hw,
                        stride_plb=args.hw, stride_plm=1, stride_ob=args.cv * args.hw,
                        stride_oc=args.hw, stride_om=1, stride_lb=args.hw, stride_lm=1,
                        HW=args.hw, CV=args.cv, SPLITS=args.splits)
    rows.append(dict(kernel="merge", block_m=64, block_n=0, block_v=64, num_warps=4,
                     num_stages=3, **_safe(kernels.memory_read_merge_kernel, merge_types,
                                           merge_values, dict(BLOCK_M=64, BLOCK_V=64, I64=False),
                                           4, 3, args.arch)))
    return rows


def _safe(*arguments):
    try:
        return compile_report(*arguments)
    except Exception as error:  # a tiling that does not compile is a result, not a crash
        return dict(error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")


FORWARD_SWEEP = [(64, 32, 512, 8, 2), (64, 32, 512, 8, 3), (64, 64, 512, 8, 2),
                 (64, 64, 256, 8, 2), (64, 64, 256, 8, 3), (128, 32, 256, 8, 2),
                 (128, 64, 256, 8, 2), (128, 64, 128, 8, 2), (128, 64, 128, 8, 3),
                 (128, 128, 128, 8, 2), (64, 32, 256, 4, 2)]
DKV_SWEEP = [(64, 64, 512, 8, 1), (64, 64, 256, 8, 1), (64, 64, 256, 8, 2), (64, 64, 128, 8, 2),
             (64, 64, 128, 8, 3), (64, 128, 128, 8, 2), (64, 128, 64, 8, 2), (64, 64, 64, 8, 2),
             (64, 64, 128, 4, 2), (32, 64, 128, 4, 2), (64, 32, 128, 4, 2)]
DQ_SWEEP = [(64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2),
            (64, 16, 8, 2), (64, 16, 4, 3)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=sorted(TRITON_TYPES))
    parser.add_argument("--similarity", default="dot", choices=["dot", "l2"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hw", type=int, default=1620)
    parser.add_argument("--n", type=int, default=1620 * 101)
    parser.add_argument("--ck", type=int, default=128)
    parser.add_argument("--cv", type=int, default=512)
    parser.add_argument("--splits", type=int, default=8)
    parser.add_argument("--forward", type=lambda s: tuple(map(int, s.split(","))), nargs="+",
                        help="forward tilings block_m,block_n,block_v,warps,stages")
    parser.add_argument("--defaults", action="store_true",
                        help="only the tilings stm_kernels uses first; print JSON, write nothing")
    args = parser.parse_args(argv)
    if kernels.INTERPRETING:
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = sweep(args)
    if args.defaults:
        print(json.dumps(rows))
        return
    print(f"{'kernel':8} {'m':>4} {'n':>4} {'v':>4} {'w':>2} {'s':>2} {'smem KiB':>9} "
          f"{'regs':>5} {'spill B':>8} {'wgmma':>6} {'mma':>5} {'cp.async':>8}")
    for row in rows:
        head = (f"{row['kernel']:8} {row['block_m']:4} {row['block_n']:4} {row['block_v']:4} "
                f"{row['num_warps']:2} {row['num_stages']:2}")
        if "error" in row:
            print(f"{head} {row['error']}")
            continue
        print(f"{head} {row['shared_bytes'] / 1024:9.1f} {row['registers']:5} "
              f"{row['spill_store_bytes']:8} {row['wgmma']:6} {row['mma_sync']:5} "
              f"{row['cp_async']:8}")
    date = datetime.datetime.now(datetime.timezone.utc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"kernel_resources_sm{args.arch}_{args.dtype}_{date:%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(dict(
        benchmark="kernel_resources", arch=f"sm_{args.arch}", triton=triton.__version__,
        date=date.isoformat(timespec="seconds"), note="compiled offline, not run: no timings",
        shapes=dict(B=args.batch, HW=args.hw, N=args.n, Ck=args.ck, Cv=args.cv,
                    dtype=args.dtype, similarity=args.similarity), rows=rows), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
