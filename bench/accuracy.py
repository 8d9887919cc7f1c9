"""What a benchmark's provider computes, against float64: a read is timed only where it is right.

    check(actual, expected, dtype_name)   (errors per output, the bound, a "wrong" status or None)
    reference_rows(q, k, v, rows, ...)    the read (and its gradients) in float64, plain torch
    sample_rows(hw)                       the query positions a check compares

Each query position's output depends on its own row of scores only, so a check compares a
sample of SAMPLE query positions: the float64 reference then costs SAMPLE x N scores, not
HW x N, and fits beside any memory a benchmark times. Gradients are checked with a cotangent
that is zero outside the sample: the reference's dK, dV and dQ are then exact for it too.
The bounds are the self-test's (normalised RMS error, gradients GRADIENT_FACTOR times looser).
"""
import torch

from stm_kernels.selftest import BOUNDS, GRADIENT_FACTOR, relative_error

SAMPLE = 32
# Benchmark dtype names to the self-test's: float32 under TF32 matmuls is held to TF32's bound.
BOUND_NAMES = {"fp32": "fp32", "fp32-tf32": "tf32", "fp16": "fp16", "bf16": "bf16",
               "fp64": "fp64"}
GRADIENTS = ("dq", "dk", "dv")


def sample_rows(hw, count=SAMPLE):
    """`count` query positions spread evenly over 0 .. hw - 1 (all of them where hw <= count)."""
    return torch.linspace(0, hw - 1, min(hw, count)).round().long().unique()


def reference_rows(q, k, v, rows, scale, grad=None, objects=None, similarity="dot",
                   top_k=None):
    """{"out": (B', Cv, S)} in float64 for query positions `rows` (S of them) of q (1 or B, Ck,
    HW) against k (B, Ck, N), v (B, Cv, N), written out in plain torch: scores
    scale * q.k ("dot") or scale * (2 q.k - |k|^2) ("l2"), the softmax over all positions or
    over each query's top_k largest scores (ties to the lower index); with grad (B, Cv, HW),
    the cotangent of out (zero outside `rows`), also "dq" (Bq, Ck, HW), "dk" (B', Ck, N),
    "dv" (B', Cv, N). objects: how many objects (the first B') the reference computes (the
    float64 copies of a large memory cost 8 bytes an element); dq is given only when all of
    them are (it sums over the objects)."""
    B = k.shape[0] if objects is None else objects
    backward = grad is not None
    q64 = q.detach().double().requires_grad_(backward)
    k64, v64 = (t[:B].detach().double().requires_grad_(backward) for t in (k, v))
    query = q64[:B, :, rows] if q64.shape[0] > 1 else q64[:, :, rows].expand(B, -1, -1)
    scores = scale * torch.einsum("bci,bcj->bij", query, k64)
    if similarity == "l2":
        scores = 2 * scores - scale * (k64 * k64).sum(1)[:, None, :]
    if top_k is not None and top_k < scores.shape[2]:
        order = torch.sort(scores.detach(), dim=2, descending=True, stable=True).indices
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter(2, order[:, :, :top_k],
                                                                    False)
        scores = scores.masked_fill(dropped, float("-inf"))
    probabilities = torch.softmax(scores, dim=2)
    out = torch.einsum("bij,bcj->bci", probabilities, v64)
    result = {"out": out.detach()}
    if backward:
        (out * grad[:B, :, rows].double()).sum().backward()
        result.update(dk=k64.grad, dv=v64.grad)
        if B == k.shape[0]:
            result["dq"] = q64.grad
    return result


def check(actual, expected, dtype_name):
    """({output: relative error} for each output in `expected`, the bound of the outputs, and
    None, or the status "wrong: ..." naming the worst output where one is over its bound
    (gradients GRADIENT_FACTOR times the outputs' bound))."""
    bound = BOUNDS[BOUND_NAMES[dtype_name]]
    errors, worst = {}, None
    for name, reference in expected.items():
        errors[name] = relative_error(actual[name], reference)
        limit = bound * (GRADIENT_FACTOR if name in GRADIENTS else 1)
        if not errors[name] <= limit and (worst is None or errors[name] / limit > worst[2]):
            worst = (name, limit, errors[name] / limit)
    status = None
    if worst is not None:
        name, limit, _ = worst
        status = (f"wrong: {name} off float64 by {errors[name]:.1e} (relative), over "
                  f"{dtype_name}'s bound {limit:.0e}; not timed")
    return errors, bound, status
