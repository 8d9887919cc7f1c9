"""Kernel benchmark of the space-time memory read: the fused Triton read against the peers an
expert would pick, forward / backward / forward+backward, over memory sizes N.

    python -m bench kernel                     # the three sweeps for the device present
    python -m bench kernel --quick             # a few points (smoke run; a CPU's default)
    python -m bench kernel --full              # on a CPU: every point (hours on 2 cores)
    python -m bench kernel --sweeps targets scaling --batches 1 --warmup   # a GPU lease's run
    python -m bench render FILE.json           # re-render a results file's plots and table

Providers, timed in the same run (PROVIDERS; the fused one is "triton" on GPU, "torch" on CPU,
every other one a peer, but the candidates):
    triton            memory_read(backend="triton"): the fused kernels
    triton_planned    the same kernels through stm_kernels.prepare_read's run (planned once:
                      no host planning per call): a call mode (MODES), never a peer
    triton_graphed    the same, captured in a CUDA graph (the forward, or the forward and its
                      backward) and replayed: no host work at all; a call mode
    torch             memory_read(backend="torch"): the chunked torch read
    naive             memory_read(backend="naive"): the official read (the whole affinity)
    sdpa              F.scaled_dot_product_attention with the full 512-wide value (PyTorch picks
                      the backend, recorded: the memory-efficient one on the H100 and H200)
    sdpa_flash_split  SDPA with the value split into chunks as wide as the key (Ck = 128,
                      Cv = 512: four 128-wide calls on the same q and k, outputs concatenated;
                      QK^T recomputed per chunk, as MemFlow does with FlashAttention-2: the
                      fused backends take a value only as wide as the key), flash forced
    sdpa_cudnn_split  the same with the cuDNN backend forced
    flex              FlexAttention compiled (torch.compile of flex_attention) with the whole
                      value width
    triton_ws         the fused read with the opt-in warp-specialised Gluon forward
                      (STM_KERNELS_WARP_SPECIALIZED=1; sm_90 only), forward pass only (its
                      backward is the plain one): a candidate for sm_90's default
                      (CANDIDATES), not a peer. It has its "vs" column but never counts as
                      the best peer.
    triton_ws_bwd     the fused read with the opt-in warp-specialised Gluon dV and dK/dQ
                      kernels (STM_KERNELS_WARP_SPECIALIZED_BACKWARD=1; sm_90 only), the
                      backward passes only (its forward is the plain one): a candidate too;
                      last in the run's order, since they have never run on a GPU.
The summary gives each candidate's verdict: the memory sizes at which it was at least 3% faster
than the fused read, and the fewest N from which it stayed faster, written as the entry
`tilings.Architecture.warp_specialized` would take to make its kernels the default from there.
A peer that cannot run is recorded with its reason, not timed: a forced SDPA backend that
refuses ("refused: " and the first line of its error, with the first warning that says why),
FlexAttention that does not compile ("error: " and its first line). The peers get their
inputs in their own layout ((B, 1, L, C) contiguous, the value chunks split beforehand),
prepared outside the timing. FLOPs are the read's (below) for every provider: a split peer
executes more (QK^T once per chunk), so its TFLOP/s is time in the read's units. Each table
row and plot point of the fused read names its best peer (the fastest that ran at that
point) and the ratio (best peer's time / fused time). The same run times an 8192^3 matmul
per dtype on GPU (2048^3 on CPU): the "% matmul" column.

Three sweeps, one results file, run in this order (a run cut off by a time limit keeps the
target points):
- "targets": the op's target points, one 480p query frame (HW = 1,620), B=1: N = 16,200
  (10 memory frames), 32,400, 64,800 and 162,000, forward and forward+backward on GPU (with
  each fused call's kernel time beside its wall time: torch.profiler's CUDA kernels per call,
  the "kernel ms" column); N = 162,000
  forward on CPU (16,200 in the quick form);
- "scaling": Ck=128, Cv=512, the main dtype (bf16 on GPU, fp32 on CPU), B in {1, 4, 8}, every
  pass, N grown until the provider runs out of memory (or past the time cap per call);
- "shapes": N fixed, B=4, Ck in {64, 128} x Cv in {256, 512} x dtypes (fp32 with TF32, fp16,
  bf16 on GPU; fp32 on CPU).
Each record has the median and 20/80% quantiles of the call time, TFLOP/s, the fraction of the
same run's matmul rate for that dtype, and the peak extra memory of one call. FLOPs per call:
forward 2*B*HW*N*(Ck+Cv); backward 2.5x that; forward+backward 3.5x.

With --warmup, every (provider, pass) series is first called untimed at its smallest N for
--warmup-s seconds (kernels compiled, FlexAttention compiled, the GPU's clocks up) before the
first timed point: a lease's first point was measured cold once (bench/NOTES.md, H100,
N = 64,800).

Writes bench/results/kernel_<device>_<date>.json and two PNGs beside it: the roofline
(fraction of the matmul rate against N, each fused point labelled with its best peer and the
ratio) and the memory plot (peak memory against N, with the point where each provider ran out
of memory). `python -m bench report` draws docs/images/gpu_read.png from the newest GPU run
(read_plot).
"""
import contextlib
import dataclasses
import math
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from bench import accuracy, common
from stm_kernels import memory_read, options

PROVIDERS = ("triton", "triton_planned", "triton_graphed", "torch", "naive", "sdpa",
             "sdpa_flash_split", "sdpa_cudnn_split", "flex", "triton_ws", "triton_ws_bwd")
# The fused read of each device type; every other provider but the candidates is its peer.
FUSED = {"cuda": "triton", "cpu": "torch"}
# Other ways of running the fused read, timed beside it to choose the default (never peers);
# each runs only the passes it changes.
CANDIDATES = ("triton_ws", "triton_ws_bwd")
# Other ways of calling the fused read's kernels: planned once (prepare_read's run: no host
# planning) and replayed from a CUDA graph (no host work at all); a "vs" column each, never
# peers. The graph holds a forward, or a forward and its backward.
MODES = ("triton_planned", "triton_graphed")
CANDIDATE_PASSES = {"triton_ws": ("fwd",), "triton_ws_bwd": ("bwd", "fwd+bwd"),
                    "triton_graphed": ("fwd", "fwd+bwd")}
# The Gluon kernels (tilings.WARP_SPECIALIZED_KERNELS) each candidate runs.
CANDIDATE_KERNELS = {"triton_ws": ("forward",), "triton_ws_bwd": ("dv", "dkdq")}
# How much faster than the default a candidate must be at a point to count as faster there
# (run-to-run noise of a warm GPU point is a few percent).
CANDIDATE_MARGIN = 0.03
# Providers whose kernels run only on a GPU (on CPU, in Triton's interpreter: not timed).
GPU_ONLY = ("triton",) + MODES + CANDIDATES
# The forced SDPA backend of each split peer; its value chunks are Ck wide (128 at the target).
SPLIT_BACKENDS = {"sdpa_flash_split": "FLASH_ATTENTION", "sdpa_cudnn_split": "CUDNN_ATTENTION"}
# Providers that may refuse these shapes or fail to compile: recorded with the reason.
MAY_REFUSE = tuple(SPLIT_BACKENDS) + ("flex", "triton_graphed") + CANDIDATES
# Those whose refusal is a "refused:" (a forced backend, an opt-in that does not apply).
REFUSING = tuple(SPLIT_BACKENDS) + ("triton_graphed",) + CANDIDATES
# Providers in SDPA's (B, heads, L, C) layout.
ATTENTION_LAYOUT = ("sdpa", "flex") + tuple(SPLIT_BACKENDS)
PASSES = ("fwd", "bwd", "fwd+bwd")
# "fp32-tf32": float32 tensors with torch.set_float32_matmul_precision("high") (TF32 cores)
DTYPES = {**options.DTYPES, "fp32-tf32": torch.float32}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
FRAME_POSITIONS = {"cuda": 1620, "cpu": 405}  # a 480p frame (30x54) / a 240x432 frame (15x27)
SCALING_FRAMES = {"cuda": (1, 4, 10, 20, 40, 100, 200, 400, 800, 1600),
                  "cpu": (1, 4, 16, 64, 256)}
SHAPES_FRAMES = {"cuda": 40, "cpu": 16}


def flops(pass_, B, HW, N, Ck, Cv):
    """Floating-point operations of one call of the pass (see the module docstring)."""
    return 2.0 * B * HW * N * (Ck + Cv) * FLOP_FACTOR[pass_]


@dataclasses.dataclass
class ProviderRead:
    """A provider's read of one memory, set up in its own layout from the read's (q (1, Ck,
    HW), k (B, Ck, N), v (B, Cv, N)). read() returns its output in that layout; leaves are the
    tensors its backward fills (in that layout); backward_context wraps its backward (the
    Gluon backward's opt-in). out_of / gradients / cotangent convert between its layout and
    the read's, for the accuracy check."""
    read: object
    leaves: tuple
    attention_layout: bool
    backward_context: object = contextlib.nullcontext
    graphed: bool = False  # the read is replayed from a CUDA graph (captured by graph_of)

    @classmethod
    def of(cls, provider, q, k, v, scale, backward=False):
        """The ProviderRead of `provider` on q, k, v (see the class; SDPA's layout, the value
        chunks of a split peer, the planned read, prepared here, outside any timing);
        backward: whether a backward pass follows (the planned read plans it too)."""
        B, Ck, HW = k.shape[0], k.shape[1], q.shape[2]
        attention_layout = provider in ATTENTION_LAYOUT
        if attention_layout:
            q = q.transpose(1, 2).unsqueeze(1).expand(B, 1, HW, Ck).contiguous()
            k = k.transpose(1, 2).unsqueeze(1).contiguous()
            v = v.transpose(1, 2).unsqueeze(1).contiguous()
        leaves, backward_context = (q, k, v), contextlib.nullcontext
        if provider == "sdpa":
            def read():
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        elif provider in SPLIT_BACKENDS:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backend = getattr(SDPBackend, SPLIT_BACKENDS[provider])
            chunks = [v[..., start:start + Ck].contiguous() for start in range(0, v.shape[-1], Ck)]
            leaves = (q, k, *chunks)
            del v

            def read():
                with sdpa_kernel([backend]):
                    return torch.cat([F.scaled_dot_product_attention(q, k, chunk, scale=scale)
                                      for chunk in chunks], dim=-1)
        elif provider == "flex":
            flex = _compiled_flex()

            def read():
                return flex(q, k, v, scale=scale)
        elif provider == "triton_ws":
            reason = _warp_specialized_reason(q, k, v)
            if reason is not None:
                raise RuntimeError(f"the Gluon forward does not run here: {reason}")

            from stm_kernels.backends.triton import launch

            def read():
                with launch.warp_specialized_forward():
                    return memory_read(q, k, v, scale=scale, backend="triton")
        elif provider == "triton_ws_bwd":  # opted in around the backward
            reason = common.warp_specialized_backward_reason(q, k, v)
            if reason is not None:
                raise RuntimeError(reason)

            from stm_kernels.backends.triton import launch
            backward_context = launch.warp_specialized_backward

            def read():
                return memory_read(q, k, v, scale=scale, backend="triton")
        elif provider in MODES:
            if provider == "triton_graphed" and q.device.type != "cuda":
                raise RuntimeError("CUDA graphs need a CUDA GPU")
            from stm_kernels import prepare_read
            for tensor in (q, k, v) if backward else ():  # leaves before the plan is built
                tensor.requires_grad_()
            plan = prepare_read(q, k, v, scale=scale, backward=backward)

            def read():
                return plan.run(q, k, v)
        else:
            def read():
                return memory_read(q, k, v, scale=scale, backend=provider)
        return cls(read, leaves, attention_layout, backward_context,
                   graphed=provider == "triton_graphed")

    def graph_of(self, cotangent=None):
        """(replay, out) of the read (with cotangent: and its backward, the leaves' .grad
        written) captured in a CUDA graph after two warm-up calls on a side stream, as
        torch.cuda.graph's recipe has it; out is the captured call's output, which each
        replay rewrites, as it does the gradients (the leaves' .grad, None at the capture)."""
        def step():
            if cotangent is None:
                with torch.no_grad():
                    return self.read()
            out = self.read()
            out.backward(cotangent)
            return out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        for tensor in self.leaves:
            tensor.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph.replay, out

    def out_of(self, out):
        """The provider's output as the read's (B, Cv, HW)."""
        return out.squeeze(1).transpose(1, 2) if self.attention_layout else out

    def cotangent(self, grad):
        """The read's cotangent (B, Cv, HW) in the provider's output layout."""
        return grad.transpose(1, 2).unsqueeze(1).contiguous() if self.attention_layout \
            else grad

    def gradients(self):
        """{"dq" (1, Ck, HW), "dk" (B, Ck, N), "dv" (B, Cv, N)} of the leaves' .grad, as the
        read's."""
        if not self.attention_layout:
            return dict(zip(GRADIENT_NAMES, (t.grad for t in self.leaves), strict=True))
        q, k, *values = self.leaves
        return {"dq": q.grad.sum(0).transpose(1, 2),  # (B, 1, HW, Ck): the objects' sum
                "dk": k.grad.squeeze(1).transpose(1, 2),
                "dv": torch.cat([t.grad for t in values], dim=-1).squeeze(1).transpose(1, 2)}


GRADIENT_NAMES = ("dq", "dk", "dv")


def _random(device, dtype, seed):
    """randn(*shape) from one generator seeded `seed` on `device`, in `dtype`."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)
    return randn


def make_inputs(provider, pass_, dtype, B, HW, N, Ck, Cv, device):
    """Random inputs in the provider's layout and a zero-argument call of the pass; returns
    (call, tensors whose .grad is cleared between calls). The STM query is shared by the B
    objects; SDPA gets its preferred (B, 1, L, C) contiguous layout, prepared here. The "bwd"
    call backpropagates through a forward done once here (graph retained)."""
    randn = _random(device, dtype, seed=0)
    q, k, v = randn(1, Ck, HW), randn(B, Ck, N), randn(B, Cv, N)
    provider_read = ProviderRead.of(provider, q, k, v, 1.0 / math.sqrt(Ck),
                                    backward=pass_ != "fwd")
    read, tensors = provider_read.read, provider_read.leaves
    backward_context = provider_read.backward_context
    if provider_read.graphed:  # one replay a call; its gradients are rewritten, not cleared
        grad = randn(B, Cv, HW) if pass_ != "fwd" else None
        replay, _ = provider_read.graph_of(grad)
        return replay, ()
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return read()
        return call, ()
    for tensor in tensors:
        tensor.requires_grad_()
    grad = randn(B, 1, HW, Cv) if provider_read.attention_layout else randn(B, Cv, HW)
    if pass_ == "bwd":
        out = read()

        def call():
            with backward_context():
                out.backward(grad, retain_graph=True)
        return call, tensors

    def call():
        out = read()
        with backward_context():
            out.backward(grad)
    return call, tensors


def check_point(provider, pass_, dtype, B, HW, N, Ck, Cv, device, dtype_name):
    """(errors, bound, status) of one call of the pass against float64 (bench.accuracy.check)
    on inputs of the point's shape: the output at a sample of query positions, and for the
    backward passes dQ, dK, dV under a cotangent on those positions alone. The reference
    covers the first object only where the memory's float64 copies would take more than a
    quarter of the free memory (dQ, which sums over the objects, is then not compared), and
    none where one object's would not fit: ({}, bound, None), not checked."""
    randn = _random(device, dtype, seed=1)
    q, k, v = randn(1, Ck, HW), randn(B, Ck, N), randn(B, Cv, N)
    scale = 1.0 / math.sqrt(Ck)
    rows = accuracy.sample_rows(HW).to(device)
    backward = pass_ != "fwd"
    grad = None
    if backward:
        grad = torch.zeros(B, Cv, HW, device=device, dtype=dtype)
        grad[:, :, rows] = randn(B, Cv, len(rows))
    free = common.available_memory_bytes() if device.type == "cpu" else \
        torch.cuda.mem_get_info(device)[0]
    per_object = (Ck + Cv) * N * 8 * (3 if backward else 1) + 3 * len(rows) * N * 8
    objects = B if B * per_object <= free / 4 else 1 if per_object <= free / 4 else 0
    bound = accuracy.BOUNDS[accuracy.BOUND_NAMES[dtype_name]]
    if objects == 0:
        return {}, bound, None
    expected = accuracy.reference_rows(q, k, v, rows, scale, grad, objects)
    provider_read = ProviderRead.of(provider, q, k, v, scale, backward=backward)
    del q, k, v
    if provider_read.graphed:  # the captured graph's replay is what is checked
        replay, out = provider_read.graph_of(provider_read.cotangent(grad) if backward else None)
        replay()
        torch.cuda.synchronize(device)
    elif backward:
        for tensor in provider_read.leaves:
            tensor.requires_grad_()
        out = provider_read.read()
        with provider_read.backward_context():
            out.backward(provider_read.cotangent(grad))
    else:
        with torch.no_grad():
            out = provider_read.read()
    actual = {name: value if name == "dq" else value[:objects]
              for name, value in provider_read.gradients().items()} if backward else {}
    actual["out"] = provider_read.out_of(out.detach())[:objects, :, rows]
    return accuracy.check(actual, expected, dtype_name)


def _warp_specialized_reason(q, k, v):
    """Why the opted-in Gluon forward would not run on these inputs (the read would warn and
    take the plain forward), or None."""
    from stm_kernels.backends.triton import tilings
    from stm_kernels.experimental import gluon_forward
    return gluon_forward.unsupported_reason(q, k, v, tilings.warp_specialized_config())


_FLEX = []


def _compiled_flex():
    """torch.compile(flex_attention), made once per process (shapes recompile inside it)."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX.append(torch.compile(flex_attention))
    return _FLEX[0]


def first_line(error):
    """The first line of an exception's message (with the next one where it ends in ':', as
    torch.compile's "backend='inductor' raised:" does), at most 240 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    line = lines[0] if not lines[0].endswith(":") or len(lines) == 1 else \
        f"{lines[0]} {lines[1]}"
    return line[:240]


def refusal(provider, error, caught=()):
    """The status of a peer that cannot run: "refused: ..." for a forced SDPA backend (its
    error's first line, and the first warning PyTorch gave for it), "error: Type: ..." for
    anything else (FlexAttention that does not compile)."""
    if provider in REFUSING and isinstance(error, RuntimeError):
        why = next((first_line(w.message) for w in caught
                    if "attention" in str(w.message).lower()
                    and not first_line(w.message).endswith(":")), None)
        return f"refused: {first_line(error)}" + (f" ({why[:200]})" if why else "")
    return f"error: {type(error).__name__}: {first_line(error)}"


def probe(provider, call):
    """None if one call of a peer that may refuse runs, else its refusal status (an out of
    memory error is raised: run_point records it as such). A Gluon candidate is refused
    where its read warned that it took the plain kernel instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - the reason is the record
            if "out of memory" in str(error).lower():
                raise
            return refusal(provider, error, caught)
    fell_back = [w for w in caught if "STM_KERNELS_WARP_SPECIALIZED" in str(w.message)]
    if provider in CANDIDATES and fell_back:
        return f"refused: {first_line(fell_back[0].message)}"
    return None


def sdpa_backend(dtype, B, HW, N, Ck, Cv, device):
    """Name of the kernel SDPA dispatches to for these shapes (torch._fused_sdp_choice)."""
    try:
        q = torch.empty((B, 1, HW, Ck), device=device, dtype=dtype)
        k = torch.empty((B, 1, N, Ck), device=device, dtype=dtype)
        v = torch.empty((B, 1, N, Cv), device=device, dtype=dtype)
        return torch.nn.attention.SDPBackend(torch._fused_sdp_choice(q, k, v)).name
    except Exception as error:  # private API: record rather than fail the benchmark
        return f"unknown ({type(error).__name__})"


def matmul_tflops(dtype_name, device):
    """Rate of a large square matmul on random data (the device's practical ceiling)."""
    size = 8192 if device.type == "cuda" else 2048
    dtype = DTYPES[dtype_name.split("-")[0]]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    with _precision(dtype_name):
        median, _, _ = common.time_ms(lambda: a @ b, device)
    return 2.0 * size ** 3 / (median * 1e-3) / 1e12


def measure_memory(spec, device):
    """Peak extra memory of one call; on CPU in a fresh process (resident-set high-water mark)."""
    if device.type == "cuda":
        call, _ = make_inputs(**{**spec, "dtype": DTYPES[spec["dtype"]]}, device=device)
        call()
        return common.cuda_peak_extra_bytes(call, device)
    return common.run_isolated("bench.kernel", spec)


def _cpu_memory_child(spec):
    call, _ = make_inputs(**{**spec, "dtype": DTYPES[spec["dtype"]]}, device=torch.device("cpu"))
    return common.cpu_peak_extra_bytes(call)


def naive_bytes_estimate(pass_, B, HW, N, dtype):
    """The official read holds the affinity and the probabilities (twice more for backward)."""
    element = torch.finfo(dtype).bits // 8
    return (2 if pass_ == "fwd" else 4) * B * HW * N * element


def _precision(dtype_name):
    return common.torch_setting(torch.get_float32_matmul_precision,
                                torch.set_float32_matmul_precision,
                                "high" if dtype_name == "fp32-tf32" else "highest")


def run_point(provider, pass_, dtype_name, B, HW, N, Ck, Cv, device, sweep):
    """The record of one (provider, pass, dtype, shape) point: its errors against float64
    (check_point), then timing and peak memory; or the reason it was not timed (out of
    memory, measured or estimated; a refusal; a result over its dtype's bound: "wrong")."""
    dtype = DTYPES[dtype_name]
    record = dict(sweep=sweep, provider=provider, **{"pass": pass_}, dtype=dtype_name, B=B,
                  HW=HW, N=N, Ck=Ck, Cv=Cv)
    spec = dict(provider=provider, pass_=pass_, dtype=dtype_name, B=B, HW=HW, N=N, Ck=Ck, Cv=Cv)
    if provider == "sdpa":
        record["sdpa_backend"] = sdpa_backend(dtype, B, HW, N, Ck, Cv, device)
    elif provider in SPLIT_BACKENDS:
        record["sdpa_backend"] = f"{SPLIT_BACKENDS[provider]} (forced, {Ck}-wide chunks)"
    if device.type == "cpu" and provider in ("naive", "sdpa") and \
            naive_bytes_estimate(pass_, B, HW, N, dtype) > 0.6 * common.available_memory_bytes():
        return {**record, "status": "oom (estimated: the affinity would not fit in free memory; "
                                    "not run)"}
    try:
        with _precision(dtype_name):
            try:
                call, reset = make_inputs(provider, pass_, dtype, B, HW, N, Ck, Cv, device)
                refused = probe(provider, call) if provider in MAY_REFUSE else None
            except (torch.cuda.OutOfMemoryError, RuntimeError):
                raise
            except Exception as error:  # noqa: BLE001 - a peer's setup (flex's import)
                if provider not in MAY_REFUSE:
                    raise
                refused = refusal(provider, error)
            if refused:
                return {**record, "status": refused}
            errors, bound, wrong = check_point(provider, pass_, dtype, B, HW, N, Ck, Cv,
                                               device, dtype_name)
            record.update(errors=errors, error_bound=bound)
            if wrong:
                return {**record, "status": wrong}
            median, low, high = common.time_ms(call, device, reset=reset)
            if device.type == "cuda" and provider in ("triton",) + MODES:
                record["kernel_ms"] = common.kernel_ms(call, device, reset=reset)
            del call, reset
            peak = measure_memory(spec, device)
    except torch.cuda.OutOfMemoryError:
        return {**record, "status": "oom"}
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():
            if provider in MAY_REFUSE:
                return {**record, "status": refusal(provider, error)}
            raise
        return {**record, "status": "oom"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**record, "status": "ok", "median_ms": median, "q20_ms": low, "q80_ms": high,
            "tflops": flops(pass_, B, HW, N, Ck, Cv) / (median * 1e-3) / 1e12,
            "peak_mem_bytes": peak}


def plan(device, args):
    """The (sweep, provider, pass, dtype, B, HW, Ck, Cv, [N...]) series to run, in order."""
    kind = device.type
    hw = args.hw or FRAME_POSITIONS[kind]
    # On CPU the fused kernels run only in Triton's interpreter (times that mean nothing);
    # the CUDA-only peers are still asked, and record their refusal.
    providers = args.providers or [p for p in PROVIDERS if kind == "cuda" or p not in GPU_ONLY]
    passes = args.passes or list(PASSES)
    main_dtype = "bf16" if kind == "cuda" else "fp32"
    shape_dtypes = args.dtypes or (["fp32-tf32", "fp16", "bf16"] if kind == "cuda" else ["fp32"])
    batches = args.batches or ([1, 4, 8] if kind == "cuda" else [1])
    quick = is_quick(device, args)
    frames = SCALING_FRAMES[kind] if not quick else SCALING_FRAMES[kind][:2]
    ns = args.ns or [hw * t for t in frames]
    series = []

    def runs(provider, pass_):
        return pass_ in CANDIDATE_PASSES.get(provider, PASSES)

    # The target points first: a run cut off by a time limit (a lent GPU's) keeps them.
    if "targets" in args.sweeps:  # one 480p query frame (HW = 1,620)
        target_passes = ["fwd", "fwd+bwd"] if kind == "cuda" else ["fwd"]
        target_ns = [16200, 32400, 64800, 162000] if kind == "cuda" else \
            [16200] if quick else [162000]
        for pass_ in target_passes:
            for provider in filter(lambda p: runs(p, pass_), providers):
                series.append(("targets", provider, pass_, main_dtype, 1, 1620, 128, 512,
                               target_ns))
    if "scaling" in args.sweeps:
        for pass_ in passes:
            for B in batches if not quick else batches[:1]:
                for provider in filter(lambda p: runs(p, pass_), providers):
                    series.append(("scaling", provider, pass_, main_dtype, B, hw, 128, 512,
                                   ns))
    if "shapes" in args.sweeps:
        n = args.shapes_n or hw * SHAPES_FRAMES[kind]
        shapes = [(64, 256), (64, 512), (128, 256), (128, 512)]
        for dtype_name in shape_dtypes if not quick else shape_dtypes[:1]:
            for pass_ in passes:
                for ck, cv in shapes if not quick else shapes[-1:]:
                    for provider in filter(lambda p: runs(p, pass_), providers):
                        series.append(("shapes", provider, pass_, dtype_name, 4, hw, ck, cv,
                                       [n]))
    return hw, series


def is_quick(device, args):
    """Whether the run takes the quick form: asked for, or a CPU's default (its full form
    takes hours on two cores: the points sized for a GPU), unless --full."""
    return args.quick or (device.type == "cpu" and not getattr(args, "full", False))


def run(args):
    """Run the planned sweeps and write the results; returns their path."""
    device = common.pick_device(args.device)
    hw, series = plan(device, args)
    if is_quick(device, args) and not args.quick:
        print("note: on a CPU the quick form runs (about 10 minutes on 2 cores); --full runs "
              "every point (hours)", file=sys.stderr)
    if device.type == "cpu" and any(s[1] in GPU_ONLY for s in series):
        print("note: triton on CPU runs in the interpreter; its times mean nothing",
              file=sys.stderr)
    payload = common.environment(device)
    max_call_s = args.max_call_s or (20.0 if device.type == "cuda" else 1.5)
    payload.update(benchmark="kernel", HW=hw, max_call_s=max_call_s,
                   flops_note="fwd: 2*B*HW*N*(Ck+Cv); bwd: 2.5x fwd; fwd+bwd: 3.5x fwd",
                   peak_mem_note=("extra bytes above the inputs during one call: CUDA allocator "
                                  "peak on GPU; on CPU the resident-set high-water mark of a "
                                  "process after one warm-up call, glibc mapping blocks >= 64 KiB "
                                  "afresh"), matmul_tflops={}, records=[])
    if device.type == "cuda":
        matmul_names = ["bf16", "fp16", "fp32-tf32", "fp32"]
    else:
        matmul_names = ["fp32"]
    for name in matmul_names:
        payload["matmul_tflops"][name] = matmul_tflops(name, device)
        print(f"matmul {name}: {payload['matmul_tflops'][name]:.2f} TFLOP/s", flush=True)
    payload["matmul_size"] = 8192 if device.type == "cuda" else 2048
    if getattr(args, "warmup", False):
        payload["warmup"] = warm_up(series, device, args.warmup_s)
        print(f"warm-up: {payload['warmup']['series']} series, "
              f"{payload['warmup']['wall_s']:.1f} s", flush=True)
    if device.type == "cuda":  # the L2 bandwidth the kernels' L2 traffic meets (bench.l2_probe)
        from bench import l2_probe
        payload["l2_read"] = l2_probe.measure(device)
        print(f"L2 read probe: {payload['l2_read']['tbps']:.2f} TB/s", flush=True)
    with common.progress(total=sum(len(s[-1]) for s in series), unit="point") as bar:
        for sweep, provider, pass_, dtype_name, B, hw_, ck, cv, ns in series:
            for index, N in enumerate(ns):
                record = run_point(provider, pass_, dtype_name, B, hw_, N, ck, cv, device, sweep)
                payload["records"].append(record)
                common.save_progress("kernel", payload)
                bar.write(format_record(record))
                bar.update(1)
                if record["status"].startswith("wrong"):
                    continue  # reported, not timed; the next N is checked afresh
                if record["status"] != "ok":
                    bar.update(len(ns) - index - 1)
                    break  # a larger N will not fit either
                if record["median_ms"] > max_call_s * 1e3 and index + 1 < len(ns):
                    payload["records"].append(dict(
                        {k: record[k] for k in ("sweep", "provider", "pass", "dtype", "B", "HW",
                                                "Ck", "Cv")}, N=ns[index + 1],
                        status=f"not run (a call at the previous N took over {max_call_s:g} s)"))
                    bar.update(len(ns) - index - 1)
                    break
    return common.finish_run("kernel", payload, plot, summary)


def warm_up(series, device, seconds):
    """Call every (provider, pass, dtype, shape) series once at its smallest N, untimed, for
    about `seconds` each (compiles, FlexAttention's compile, the clocks); what fails here is
    left for the timed point to record. Returns {series, seconds_each, wall_s}."""
    started = time.perf_counter()
    seen = set()
    for _, provider, pass_, dtype_name, B, hw, ck, cv, ns in series:
        key = (provider, pass_, dtype_name, B, hw, ck, cv)
        if key in seen:
            continue
        seen.add(key)
        try:
            with _precision(dtype_name), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call, reset = make_inputs(provider, pass_, DTYPES[dtype_name], B, hw, min(ns),
                                          ck, cv, device)
                until = time.perf_counter() + seconds
                while True:
                    for tensor in reset:
                        tensor.grad = None
                    call()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if time.perf_counter() >= until:
                        break
                del call, reset
        except Exception:  # noqa: BLE001 - the timed point records why it cannot run
            pass
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return dict(series=len(seen), seconds_each=seconds,
                wall_s=time.perf_counter() - started)


def format_record(record):
    """One record as a line of progress output."""
    head = (f"{record.get('sweep', ''):>7} {record['provider']:>16} {record['pass']:>7} "
            f"{record['dtype']} B={record['B']} Ck={record['Ck']} Cv={record['Cv']} "
            f"N={record['N']:>7}")
    if record["status"] != "ok":
        return f"{head}  {record['status']}"
    extra = f"  [{record['sdpa_backend']}]" if "sdpa_backend" in record else ""
    return (f"{head}  {record['median_ms']:9.3f} ms  {record['tflops']:7.2f} TFLOP/s  "
            f"{record['peak_mem_bytes'] / 2**20:9.1f} MiB  error {worst_error(record)}{extra}")


def worst_error(record):
    """The largest of a record's relative errors against float64 (bench.accuracy), as text:
    "-" for a record from before the checks, "not checked" where the reference did not fit."""
    if "errors" not in record:
        return "-"
    return f"{max(record['errors'].values()):.1e}" if record["errors"] else "not checked"


def _fused(payload):
    return FUSED.get(payload["device_type"], "torch")


def _fraction(payload, record):
    rates = payload["matmul_tflops"]
    rate = rates.get(record["dtype"]) or rates.get("fp32")
    return record["tflops"] / rate if rate else float("nan")


POINT_KEY = ("sweep", "pass", "dtype", "B", "HW", "N", "Ck", "Cv")


def _point(record):
    return tuple(record.get(key, "scaling") for key in POINT_KEY)


def peers_of(payload):
    """The peers a run has records of (every provider but the fused one and the candidates),
    in PROVIDERS order (then any other name, sorted)."""
    present = {r["provider"] for r in payload["records"]} - {_fused(payload), *CANDIDATES,
                                                             *MODES}
    return [p for p in PROVIDERS if p in present] + sorted(present - set(PROVIDERS))


def candidates_of(payload):
    """The candidates (CANDIDATES) a run has records of."""
    present = {r["provider"] for r in payload["records"]}
    return [c for c in CANDIDATES if c in present]


def modes_of(payload):
    """The fused read's other call modes (MODES) a run has records of."""
    present = {r["provider"] for r in payload["records"]}
    return [m for m in MODES if m in present]


def index_points(payload):
    """{(provider,) + point: record}: the last record of each provider at each point (a
    point measured twice in one run keeps the later, warmer one)."""
    return {(r["provider"],) + _point(r): r for r in payload["records"]}


def candidate_verdicts(payload):
    """[dict(candidate, pass, dtype, B, HW, Ck, Cv, ns, faster, faster_from)] per candidate,
    pass and shape it ran
    with the fused read beside it: the memory sizes N measured by both, at which of them the
    candidate was at least CANDIDATE_MARGIN faster, and the fewest N from which it was faster
    at every larger N measured (None: at none, or not at the largest): the entry
    tilings.Architecture.warp_specialized would take for its kernels."""
    index = index_points(payload)
    fused = _fused(payload)
    verdicts = {}
    for r in payload["records"]:
        if r["provider"] not in CANDIDATES or r["status"] != "ok":
            continue
        base = index.get((fused,) + _point(r))
        if base is None or base.get("status") != "ok" or index.get((r["provider"],) +
                                                                   _point(r)) is not r:
            continue
        key = (r["provider"], r["pass"], r["dtype"], r["B"], r["HW"], r["Ck"], r["Cv"])
        verdicts.setdefault(key, {})[r["N"]] = \
            r["median_ms"] <= (1.0 - CANDIDATE_MARGIN) * base["median_ms"]
    rows = []
    for (candidate, pass_, dtype, B, HW, Ck, Cv), faster in verdicts.items():
        ns = sorted(faster)
        faster_from = None
        for n in reversed(ns):  # the longest run of faster points that ends at the largest N
            if not faster[n]:
                break
            faster_from = n
        rows.append({"candidate": candidate, "pass": pass_, "dtype": dtype, "B": B, "HW": HW,
                     "Ck": Ck, "Cv": Cv, "ns": ns, "faster": [n for n in ns if faster[n]],
                     "faster_from": faster_from})
    return rows


def _candidate_lines(payload):
    """Markdown lines: each candidate's verdict against the fused read (candidate_verdicts)."""
    rows = candidate_verdicts(payload)
    if not rows:
        return []
    lines = ["", f"Candidates against the fused read (faster: at least "
                 f"{CANDIDATE_MARGIN:.0%} shorter at that N):", "",
             "| candidate | pass | dtype | B | HW | Ck | Cv | N measured | faster at | "
             "faster from N on | as a default (tilings.Architecture.warp_specialized) |",
             "|---" * 11 + "|"]
    for row in rows:
        entry = ", ".join(f'"{kernel}": {row["faster_from"]}'
                          for kernel in CANDIDATE_KERNELS[row["candidate"]])
        measured = ", ".join(map(str, row["ns"]))
        faster = ", ".join(map(str, row["faster"])) or "none"
        lines.append(
            f"| {row['candidate']} | {row['pass']} | {row['dtype']} | {row['B']} | "
            f"{row['HW']} | {row['Ck']} | {row['Cv']} | {measured} | {faster} | "
            f"{row['faster_from'] or 'never'} | "
            + (f"{{{entry}}}" if row["faster_from"] else "not faster: stays opt-in") + " |")
    return lines


def best_peer(payload, record, index=None):
    """(name, ratio) of the fastest peer that ran at the record's point, ratio = its time /
    the record's time (how many times faster the fused read is); (None, None) if none ran."""
    index = index_points(payload) if index is None else index
    times = {peer: index[(peer,) + _point(record)]["median_ms"] for peer in peers_of(payload)
             if index.get((peer,) + _point(record), {}).get("status") == "ok"}
    if not times or record.get("status") != "ok":
        return None, None
    name = min(times, key=times.get)
    return name, times[name] / record["median_ms"]


def _status_word(status):
    """A short word for a record that did not run: oom, refused, error, not run."""
    return status.split(":")[0].split(" (")[0]


def summary(payload):
    """Markdown: the fused provider's time, TFLOP/s, % of matmul and memory, its best peer
    and the speed-up over it, the speed-up over each peer; then the peers that did not run
    and why, and the N at which each provider ran out of memory."""
    records = payload["records"]
    index = index_points(payload)
    fused = _fused(payload)
    peers = peers_of(payload)
    others = modes_of(payload) + peers + candidates_of(payload)  # a "vs" column each
    kernel_times = any("kernel_ms" in r for r in records)
    rows = ["| sweep | pass | dtype | B | HW | Ck | Cv | N | ms | "
            + ("kernel ms | wall / kernel | " if kernel_times else "") + "TFLOP/s | % matmul | "
            "peak MiB | error | best peer | vs best peer | "
            + "".join(f"vs {other} | " for other in others) + "naive peak / peak |",
            "|---" * (16 + 2 * kernel_times + len(others)) + "|"]
    seen = set()
    for r in records:
        if r["provider"] != fused or r["status"] != "ok" or \
                index.get((fused,) + _point(r)) is not r or _point(r) in seen:
            continue
        seen.add(_point(r))
        cells = [r.get("sweep", "scaling"), r["pass"], r["dtype"], r["B"], r["HW"], r["Ck"],
                 r["Cv"],
                 r["N"], f"{r['median_ms']:.3f}"]
        if kernel_times:
            kernel = r.get("kernel_ms")
            cells += [f"{kernel:.3f}" if kernel else "-",
                      f"{r['median_ms'] / kernel:.2f}x" if kernel else "-"]
        cells += [f"{r['tflops']:.2f}",
                 f"{100 * _fraction(payload, r):.0f}%", f"{r['peak_mem_bytes'] / 2**20:.1f}",
                 worst_error(r)]
        name, ratio = best_peer(payload, r, index)
        cells += [name or "none ran", f"**{ratio:.2f}x**" if ratio else "n/a"]
        for other in others:
            base = index.get((other,) + _point(r))
            if base is None:
                cells.append("n/a")
            elif base["status"] != "ok":
                cells.append(_status_word(base["status"]))
            else:
                cells.append(f"{base['median_ms'] / r['median_ms']:.2f}x")
        naive = index.get(("naive",) + _point(r))
        cells.append(f"{naive['peak_mem_bytes'] / max(r['peak_mem_bytes'], 1):.1f}x"
                     if naive and naive["status"] == "ok" and fused != "naive" else "n/a")
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    rows += ["", "`vs X`: X's time over the fused read's (above 1: the fused read is faster); "
                 "`best peer`: the fastest peer that ran at that point (the call modes "
                 "triton_planned and triton_graphed are the fused kernels called otherwise, "
                 "never peers: below 1, faster than the eager call); `error`: the largest "
                 "relative error of the fused read's outputs (and gradients) against float64 "
                 "at that point (bench/accuracy.py; a provider over its dtype's bound is "
                 "reported wrong, not timed)."]
    if candidates_of(payload):
        rows[-1] += (" Candidates (" + ", ".join(candidates_of(payload)) + ": other ways of "
                     "running the fused read, timed to choose the default) are never a peer; "
                     "below 1, the candidate was faster.")
    rows += _candidate_lines(payload)
    rates = payload.get("matmul_tflops") or {}
    if rates:
        size = payload.get("matmul_size") or (8192 if payload["device_type"] == "cuda" else 2048)
        rows += ["", f"Same-run {size}³ matmul: " + ", ".join(
            f"{name} {rate:.1f} TFLOP/s" for name, rate in rates.items()) + "."]
    if "warmup" in payload:
        warm = payload["warmup"]
        rows += ["", f"Warm-up before the first timed point: {warm['series']} series called "
                     f"for {warm['seconds_each']:g} s each ({warm['wall_s']:.0f} s)."]
    refused = {}
    for r in records:
        if r["provider"] != fused and r["status"] not in ("ok",) and \
                not r["status"].startswith(("oom", "not run")):
            wrong = r["status"].startswith("wrong")  # one row per provider: its worst
            refused.setdefault((r["provider"], "wrong" if wrong else r["status"]), []).append(r)
    if refused:
        rows += ["", "Peers (and candidates) that did not run, and why:", "",
                 "| peer | passes | points | why |", "|---|---|---|---|"]
        for (provider, status), found in refused.items():
            passes = sorted({r["pass"] for r in found}, key=PASSES.index)
            if status == "wrong":
                status = max(found, key=lambda r: max(r["errors"].values()))["status"]
            rows.append(f"| {provider} | {', '.join(passes)} | {len(found)} | "
                        f"{status.replace('|', '/')} |")
    if "l2_read" in payload:
        probe = payload["l2_read"]
        rows += ["", f"L2 read probe (bench.l2_probe, a lower bound): {probe['tbps']:.2f} TB/s "
                     f"({probe['programs']} programs re-reading {probe['buffer_mib']} MiB)."]
    limits = out_of_memory_points(payload)
    if limits:
        rows += ["", "Largest N that ran and what stopped the sweep (scaling sweep):", "",
                 "| provider | pass | dtype | B | largest N run | stopped at N | why |",
                 "|---|---|---|---|---|---|---|"]
        for (provider, pass_, dtype, B), (largest, stop, why) in limits.items():
            if why.startswith(("refused", "error")):  # the reason is in the table above
                why = _status_word(why)
            rows.append(f"| {provider} | {pass_} | {dtype} | {B} | {largest or 'none'} | "
                        f"{stop or '-'} | {why} |")
    return "\n".join(rows)


def out_of_memory_points(payload):
    """{(provider, pass, dtype, B): (largest N that ran, N where the sweep stopped, why)}."""
    limits = {}
    for r in payload["records"]:
        if r.get("sweep", "scaling") != "scaling":
            continue
        key = (r["provider"], r["pass"], r["dtype"], r["B"])
        if r["status"].startswith("wrong"):
            continue  # not a limit of the sweep: the next N was checked (the peers' table)
        largest, stop, why = limits.get(key, (None, None, "reached the end of the sweep"))
        if r["status"] == "ok":
            largest = max(largest or 0, r["N"])
        elif stop is None:
            stop, why = r["N"], r["status"]
        limits[key] = (largest, stop, why)
    return limits


COLOURS = dict(triton="C0", torch="C1", naive="C3", sdpa="C2", sdpa_flash_split="C4",
               sdpa_cudnn_split="C5", flex="C6", triton_ws="C7", triton_ws_bwd="C8",
               triton_planned="C9", triton_graphed="black")
assert set(COLOURS) == set(PROVIDERS)


def _label_best_peers(axis, payload, fused_records, values, index):
    """Write "<ratio>x <best peer>" beside each of the fused read's points."""
    for record, y in zip(fused_records, values, strict=True):
        name, ratio = best_peer(payload, record, index)
        if name:
            axis.annotate(f"{ratio:.1f}x {name}", (record["N"], y), textcoords="offset points",
                          xytext=(3, 4), fontsize=6, rotation=35)


def plot(payload, path):
    """Roofline (fraction of the matmul rate vs N) and memory (peak vs N) PNGs; returns paths."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]); no plot", file=sys.stderr)
        return []
    records = [r for r in payload["records"] if r.get("sweep", "scaling") == "scaling"]
    if not records:  # the plots are of the scaling sweep; the others are tables only
        print("no scaling sweep in this run: no plot (the table has the results)",
              file=sys.stderr)
        return []
    batches = sorted({r["B"] for r in records}) or [1]
    passes = [p for p in PASSES if any(r["pass"] == p for r in records)]
    title = (f"memory_read on {payload['device']} (torch {payload['torch']}, triton "
             f"{payload['triton']}, {payload['date'][:10]}), HW={payload['HW']}, Ck=128, Cv=512")
    fused = _fused(payload)
    index = index_points(payload)
    written = []
    for name, value, ylabel, log_y in (
            ("roofline", lambda r: 100 * _fraction(payload, r), "% of the same-run matmul rate",
             False),
            ("memory", lambda r: r["peak_mem_bytes"] / 2**20, "peak extra memory (MiB)", True)):
        figure, axes = common.subplots(len(passes), len(batches), squeeze=False,
                                       figsize=(max(4.5 * len(batches), 9), 3.4 * len(passes)))
        for row, pass_ in enumerate(passes):
            for column, B in enumerate(batches):
                axis = axes[row][column]
                positive = False
                for provider in PROVIDERS:
                    series = sorted((r for r in records if r["provider"] == provider and
                                     r["pass"] == pass_ and r["B"] == B), key=lambda r: r["N"])
                    ok = [r for r in series if r["status"] == "ok"]
                    if not series:
                        continue
                    if ok:
                        values = [value(r) for r in ok]
                        positive = positive or max(values) > 0
                        axis.plot([r["N"] for r in ok], values, marker="o",
                                  color=COLOURS[provider], label=f"{provider} {ok[0]['dtype']}")
                    if provider == fused and name == "roofline":
                        _label_best_peers(axis, payload, ok, values if ok else [], index)
                    stopped = [r for r in series if r["status"].startswith("oom")]
                    if stopped and ok:
                        axis.plot([stopped[0]["N"]], [value(ok[-1])], marker="x",
                                  markersize=10, color=COLOURS[provider], linestyle="none")
                axis.set(xscale="log", title=f"{pass_}, B={B}", xlabel="memory positions N")
                if log_y and positive:  # a log axis needs a positive value to show
                    axis.set_yscale("log")
                else:  # room above the points for the best-peer labels
                    axis.set_ylim(bottom=0, top=axis.get_ylim()[1] * 1.25)
                if column == 0:
                    axis.set_ylabel(ylabel)
                axis.legend(fontsize=7)
        caption = ("x: the N at which the provider ran out of memory" if name == "memory"
                   else "TFLOP/s as a fraction of a large square matmul in the same run; "
                        f"labels: {fused}'s speed-up over the best peer at that N, and its name")
        figure.suptitle(f"{title}\n{caption}", fontsize=9)
        written += common.save_figure(figure, path, name=name)
    return written


# The README's GPU plot: the target shape (one 480p query frame, one object, bf16).
READ_PLOT_SHAPE = dict(dtype="bf16", B=1, HW=1620, Ck=128, Cv=512)
READ_PLOT_PASSES = ("fwd", "fwd+bwd")
READ_PLOT_SWEEPS = ("targets", "scaling")


def read_plot_points(payload, sweeps=READ_PLOT_SWEEPS):
    """{(provider, pass): {N: record}} of the target shape in a run, the given sweeps together
    (the later record where a point was measured twice)."""
    points = {}
    for record in payload["records"]:
        if record["pass"] in READ_PLOT_PASSES and record.get("sweep", "scaling") in sweeps \
                and all(record.get(key) == value for key, value in READ_PLOT_SHAPE.items()):
            points.setdefault((record["provider"], record["pass"]), {})[record["N"]] = record
    return points


def read_plot_run(payloads):
    """The run the README's GPU plot is drawn from: of the GPU kernel runs given, the newest
    whose scaling sweep measured the fused read at three or more memory sizes of the target
    shape (the curve to millions of positions), else the newest with three or more such sizes
    in any sweep (a targets-only run's three), else the newest with any; None if none has one."""
    def fused_sizes(payload, sweeps=READ_PLOT_SWEEPS):
        found = read_plot_points(payload, sweeps).get((FUSED["cuda"], "fwd"), {})
        return sum(record["status"] == "ok" for record in found.values())
    runs = sorted((p for p in payloads if p.get("device_type") == "cuda" and fused_sizes(p)),
                  key=lambda p: p["date"])
    swept = [p for p in runs if fused_sizes(p, ("scaling",)) >= 3]
    curves = [p for p in runs if fused_sizes(p) >= 3]
    return (swept or curves or runs or [None])[-1]


def read_plot(payload, path, source=None):
    """The README's GPU plot: time against memory frames (N / HW) for the fused read's forward
    and forward + backward, the best peer at each N (the fastest peer that ran there: its name
    beside the point) and the naive read, the out-of-memory points marked; one object, one
    480p query frame, bf16. Writes a PNG at path (its "Source" text names `source`); returns
    [path]."""
    import pathlib
    common.subplots(1, 1)  # matplotlib off screen
    import matplotlib.pyplot as plt
    points = read_plot_points(payload)
    fused = FUSED["cuda"]
    peers = [p for p in PROVIDERS if p not in (fused, "naive", *CANDIDATES)]
    figure, axis = plt.subplots(1, 1, figsize=(8, 4.8))
    hw = READ_PLOT_SHAPE["HW"]
    styles = {"fwd": dict(linestyle="-", marker="o"), "fwd+bwd": dict(linestyle="--", marker="s")}
    top = []
    for pass_ in READ_PLOT_PASSES:
        mine = points.get((fused, pass_), {})
        ok = sorted((N, r) for N, r in mine.items() if r["status"] == "ok")
        best = []
        for N, record in ok:
            times = {peer: points[(peer, pass_)][N]["median_ms"] for peer in peers
                     if points.get((peer, pass_), {}).get(N, {}).get("status") == "ok"}
            if times:
                name = min(times, key=times.get)
                best.append((N, times[name], name, times[name] / record["median_ms"]))
        naive = sorted((N, r) for N, r in points.get(("naive", pass_), {}).items())
        naive_ok = [(N, r["median_ms"]) for N, r in naive if r["status"] == "ok"]
        for label, series, colour in ((f"fused {pass_}", [(N, r["median_ms"]) for N, r in ok],
                                       "C0"),
                                      (f"best peer {pass_}", [(N, ms) for N, ms, _, _ in best],
                                       "C2"),
                                      (f"naive {pass_}", naive_ok, "C3")):
            if series:
                axis.plot([N / hw for N, _ in series], [ms for _, ms in series], color=colour,
                          label=label, **styles[pass_])
                top += [ms for _, ms in series]
        for N, ms, name, ratio in best:
            axis.annotate(f"{ratio:.1f}x vs {name}", (N / hw, ms), textcoords="offset points",
                          xytext=(4, -10 if pass_ == "fwd" else 6), fontsize=6.5, color="C2")
        stopped = [(N, provider) for provider in [fused, "naive"] + peers
                   for N, r in points.get((provider, pass_), {}).items()
                   if r["status"].startswith("oom")]
        for N, provider in stopped:
            axis.plot([N / hw], [max(top or [1.0])], marker="x", markersize=10, color="k",
                      linestyle="none")
            axis.annotate(f"{provider} {pass_}: out of memory", (N / hw, max(top or [1.0])),
                          textcoords="offset points", xytext=(-40, 8), fontsize=6.5)
    axis.set(xscale="log", yscale="log", xlabel=f"memory frames (N / {hw})",
             ylabel="time per read (ms, median)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, loc="upper left")
    best_note = ("best peer: the fastest of " + ", ".join(
        p for p in peers if any(k[0] == p for k in points)) + " at each N")
    figure.suptitle(f"The memory read on {payload['device']}, {payload['date'][:10]} "
                    f"(torch {payload['torch']}, triton {payload['triton']})\n"
                    f"one object, one 480p query frame (HW = {hw}), Ck = 128, Cv = 512, bf16; "
                    f"{best_note}; x: out of memory", fontsize=8)
    common.fit_title(figure)
    figure.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, metadata={"Source": source or payload.get("_file", "")})
    plt.close(figure)
    return [path]


def main(argv=None):
    """`python -m bench kernel`; returns the exit code."""
    parser = common.benchmark_parser(__doc__, "python -m bench kernel")
    parser.add_argument("--sweeps", nargs="+", default=["scaling", "shapes", "targets"],
                        choices=["scaling", "shapes", "targets"])
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS)
    parser.add_argument("--passes", nargs="+", choices=PASSES)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        help="dtypes of the shapes sweep")
    parser.add_argument("--batches", nargs="+", type=int, help="B of the scaling sweep")
    parser.add_argument("--ns", nargs="+", type=int, help="memory sizes N of the scaling sweep")
    parser.add_argument("--shapes-n", type=int, help="memory size N of the shapes sweep")
    parser.add_argument("--hw", type=int, help="query positions (default: one frame)")
    parser.add_argument("--max-call-s", type=float,
                        help="stop growing N for a provider once one call takes longer "
                             "(default: 20 s on GPU, 1.5 s on CPU)")
    quick = parser.add_mutually_exclusive_group()
    quick.add_argument("--quick", action="store_true",
                       help="a few points only (the default on a CPU)")
    quick.add_argument("--full", action="store_true",
                       help="on a CPU: every point (hours on two cores), not the quick form")
    parser.add_argument("--warmup", action="store_true",
                        help="call every series untimed at its smallest N before timing")
    parser.add_argument("--warmup-s", type=float, default=1.0,
                        help="seconds of untimed calls per series with --warmup (default 1)")
    args = common.parse_args_or_run_child(parser, argv, _cpu_memory_child)
    if args is not None:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
