"""One forward and one forward+backward of the memory read at the target shape, for a profiler.

    ncu --kernel-name regex:memory_read --launch-skip 6 --set full -o prof \\
        python -m bench.profile_target            # (bash bench/gpu_session.sh profile)

Target: B=1, HW=1,620 (one 480p frame), N=162,000 (100 memory frames), Ck=128, Cv=512, bf16.
The first round compiles and warms up (skip its launches in the profiler); the second is the
one to read. With --warp-specialized the forward is the opt-in Gluon kernel.
"""
import argparse
import os

import torch

from stm_kernels import memory_read
from stm_kernels import memory_read_triton as launchers


def main(argv=None):
    """`python -m bench.profile_target`: two rounds of reads on the GPU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=162000)
    parser.add_argument("--hw", type=int, default=1620)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warp-specialized", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if args.warp_specialized:
        os.environ[launchers.WARP_SPECIALIZED_ENV] = "1"
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.bfloat16)
    q = randn(1, 128, args.hw).requires_grad_()
    k = randn(args.batch, 128, args.n).requires_grad_()
    v = randn(args.batch, 512, args.n).requires_grad_()
    grad = randn(args.batch, 512, args.hw)
    for round_ in ("warm-up", "profiled"):
        torch.cuda.nvtx.range_push(round_)
        with torch.no_grad():
            memory_read(q, k, v, backend="triton")
        memory_read(q, k, v, backend="triton").backward(grad)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    print("done: kernels of the second round are the profiled ones")


if __name__ == "__main__":
    main()
