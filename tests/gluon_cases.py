"""Inputs the Gluon kernels' tests share (tests/kernels/test_gluon_*.py): the backward's
operands laid out as TMA needs them, their float64 reference, q and dO padded as the backward's
launcher pads them, and an H100 pretended for the launchers on CPU."""
import types

import torch

from reference import reference_read


def backward_inputs(B, Bq, Ck, Cv, HW, N, dtype, seed=0, batch_gap=0, device="cpu"):
    """q (Bq, Ck, HW), k (B, Ck, N), v (B, Cv, N), dO (B, Cv, HW); k and v stored with rows of
    round8(N) (TMA's 16-byte strides; a ragged N is a slice, zero-filled past it by TMA) and
    batch_gap extra channels between objects (object strides that do not fold into TMA rows:
    one launch per object)."""
    generator = torch.Generator().manual_seed(seed)
    width = -(-N // 8) * 8
    q = torch.randn(Bq, Ck, HW, generator=generator, dtype=torch.float64)
    k = torch.randn(B, Ck + batch_gap, width, generator=generator, dtype=torch.float64)
    v = torch.randn(B, Cv + batch_gap, width, generator=generator, dtype=torch.float64)
    do = torch.randn(B, Cv, HW, generator=generator, dtype=torch.float64)
    q, k, v, do = (t.to(device=device, dtype=dtype) for t in (q, k, v, do))
    return q, k[:, :Ck, :N], v[:, :Cv, :N], do


def backward_reference(q, k, v, do, scale, l2):
    """Autograd of the float64 read written out in plain torch (tests/reference.py), on the
    inputs' device (a GPU's float64 takes milliseconds where a CPU's takes seconds at the
    target shape): .dq, .dk, .dv, and .lse (natural log) and .delta (rowsum(dO O)) as the
    backward kernels take them."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse, _ = reference_read(qd, kd, vd, scale=scale, similarity="l2" if l2 else "dot",
                                 device=qd.device)
    out.backward(do.detach().double())
    delta = (do.detach().double() * out.detach()).sum(1)
    return types.SimpleNamespace(dq=qd.grad, dk=kd.grad, dv=vd.grad, lse=lse.detach(),
                                 delta=delta)


def padded_rows(t):
    """t with rows 16 elements apart, as the backward's launcher pads q and dO."""
    width = -(-t.shape[2] // 16) * 16
    padded = torch.zeros(t.shape[:2] + (width,), dtype=t.dtype, device=t.device)
    return padded[:, :, :t.shape[2]].copy_(t)


def pretended_h100():
    """An H100 with 32 multiprocessors (a few memory splits at small N), its tilings run by
    the interpreter (with devices.pretend)."""
    from stm_kernels.backends.triton import devices
    return devices.Device("NVIDIA H100 (pretended)", "nvidia", "sm_90", 227 * devices.KIB, 32)
