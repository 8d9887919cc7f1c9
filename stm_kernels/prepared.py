"""`prepare_read`: the fused read planned once for one layout, then run many times.

    plan = stm_kernels.prepare_read(query_key, memory_key, memory_value)   # plans, runs once
    out = plan.run(query_key, memory_key, memory_value)                    # no host work

A `PreparedRead` holds the Triton passes a read of that layout runs (the forward, its backward,
a top-k selection: the kept passes of backends/triton/kept_launches.py, the very objects
`memory_read` finds in its cache for the same layout). `run` checks that its tensors have the
layout it was built for (shape, strides, dtype, device; a one-line ValueError naming the
argument otherwise), then calls those passes: no planning, no host read of a device value
(no `.item()`, no sync), nothing but its kernels and the allocation of their outputs, in the
forward and, through autograd, in the backward. The exceptions, each device work without a
sync: the L2 similarity's |k|^2 (three torch ops), a 32-bit query's copy into 16-aligned rows,
dQ's cast from its float32 accumulator to a 16-bit query's dtype, an incoming gradient not laid
out as the output is copied into that layout, and the top-k read's softmax over its picks
(torch's gather and softmax: topk.selected_read).
"""
import dataclasses
from typing import Optional

import torch

from . import inputs, topk
from .options import Similarity
from .torch_common import accumulation_dtype


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What a tensor passed to run must match: shape, strides, dtype, device."""
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t):
        return cls(tuple(t.shape), t.stride(), t.dtype, t.device)

    def matches(self, t):
        return (isinstance(t, torch.Tensor) and t.device == self.device
                and t.dtype == self.dtype and t.shape == self.shape
                and t.stride() == self.stride)

    def __str__(self):
        return (f"shape {self.shape}, strides {self.stride}, {str(self.dtype)[6:]} on "
                f"{self.device}")


def _described(t):
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return str(_Layout.of(t))


class PreparedRead:
    """A memory read planned for one layout (built by prepare_read): run(query_key, memory_key,
    memory_value[, memory_lengths]) reads tensors of that layout with no planning and no host
    read of a device value; its backward (autograd) likewise."""

    def __init__(self, layouts, query_spatial, scale, l2, top_k, return_lse, forward,
                 backwards, select):
        self._layouts = layouts  # {argument name: _Layout}
        self._query_spatial = query_spatial
        self.scale, self.l2, self.top_k, self.return_lse = scale, l2, top_k, return_lse
        self._forward = forward  # PreparedForward, or None for a top-k read
        self._backwards = backwards  # {grad_lse given: PreparedBackward}; {} without backward
        self._select = select  # PreparedSelect of a top-k read, else None

    @property
    def layout(self):
        """{argument: (shape, strides, dtype, device)} the read was built for."""
        return {name: (layout.shape, layout.stride, layout.dtype, layout.device)
                for name, layout in self._layouts.items()}

    def _checked(self, name, t):
        layout = self._layouts[name]
        if not layout.matches(t):
            raise ValueError(f"PreparedRead.run: {name} must have {layout} as the read was "
                             f"prepared for; got {_described(t)}")
        return t

    def run(self, query_key, memory_key, memory_value, memory_lengths=None):
        """out (B, Cv, *Q) of the read (with return_lse=True at build: (out, lse)), gradients
        flowing to the three inputs as memory_read's. The tensors must have the layout the
        read was built for; memory_lengths (with a ragged build only) a (B,) int32 tensor on
        the memory's device, new values on every call if need be, not checked (that would
        read the device): keep them in [1, N]."""
        q = self._checked("query_key", query_key)
        k = self._checked("memory_key", memory_key)
        v = self._checked("memory_value", memory_value)
        if ("memory_lengths" in self._layouts) != (memory_lengths is not None):
            raise ValueError("PreparedRead.run: memory_lengths " + (
                "is required: the read was prepared ragged" if memory_lengths is None else
                "was not given when the read was prepared (prepare a ragged read for it)"))
        lengths = None if memory_lengths is None else \
            self._checked("memory_lengths", memory_lengths)
        q, k, v = (inputs._positions_last(t) for t in (q, k, v))
        if self._select is not None:
            with torch.no_grad():
                _, indices = self._select(q, k, lengths)
            out, lse, _ = topk.selected_read(q, k, v, indices, self.scale, self.l2)
            lse = lse.to(accumulation_dtype(v.dtype))
        elif torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            if not self._backwards:
                raise RuntimeError("PreparedRead.run: gradients are asked for, but the read was "
                                   "prepared without its backward (prepare_read(..., "
                                   "backward=True))")
            out, lse = _PreparedFunction.apply(self, lengths, q, k, v)
        else:
            out, lse = self._forward(q, k, v, lengths)
        out = out if len(self._query_spatial) == 1 else out.unflatten(2, self._query_spatial)
        if not self.return_lse:
            return out
        return out, lse if len(self._query_spatial) == 1 else \
            lse.unflatten(1, self._query_spatial)

    def _gradient(self, grad_out, grad_lse, q, k, v, out, lse, lengths):
        """(dq, dk, dv) by the backward planned at build, grad_out taken into the output's
        layout where it is not in it (a copy)."""
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        elif grad_out.stride() != out.stride():
            grad_out = torch.empty_like(out).copy_(grad_out)
        backward = self._backwards.get(grad_lse is not None)
        if backward is None:
            raise RuntimeError("PreparedRead: a gradient of lse reached a read prepared with "
                               "return_lse=False")
        if grad_lse is not None and grad_lse.stride() != lse.stride():
            grad_lse = torch.empty_like(lse).copy_(grad_lse)
        return backward(grad_out, grad_lse, q, k, v, out, lse, lengths)

    def __repr__(self):
        kind = f"top-{self.top_k}" if self.top_k else "dense"
        return (f"PreparedRead({kind}, {'l2' if self.l2 else 'dot'}, scale={self.scale:g}, "
                f"{', '.join(f'{n}: {lay}' for n, lay in self._layouts.items())})")


class _PreparedFunction(torch.autograd.Function):
    """A PreparedRead's forward and backward under autograd (old style, as memory_read's
    _FusedRead: no signature binding per call)."""

    @staticmethod
    def forward(ctx, plan, lengths, q, k, v):
        out, lse = plan._forward(q, k, v, lengths)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, lengths)
        ctx.plan = plan
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if grad_out is None and grad_lse is None:
            return None, None, None, None, None
        q, k, v, out, lse, lengths = ctx.saved_tensors
        dq, dk, dv = ctx.plan._gradient(grad_out, grad_lse, q, k, v, out, lse, lengths)
        return None, None, dq, dk, dv


def prepare_read(query_key: torch.Tensor, memory_key: torch.Tensor,
                 memory_value: torch.Tensor, *, scale: Optional[float] = None,
                 similarity: Similarity = "dot", memory_lengths: Optional[torch.Tensor] = None,
                 top_k: Optional[int] = None, return_lse: bool = False,
                 backward: Optional[bool] = None) -> PreparedRead:
    """The fused Triton read planned for the layout of these tensors (B, HW, the memory's
    capacity N, Ck, Cv, dtype, device, strides, similarity, top-k, raggedness): it runs the
    read once on them (planning, compiling) and returns a PreparedRead whose run() reads new
    tensors of the same layout with no host work but its launches.

    Arguments as memory_read's (one memory tensor, not a list of chunks; "dot" or "l2"; the
    Triton backend: CUDA, or the CPU under TRITON_INTERPRET=1). memory_lengths: give a (B,)
    int32 tensor on the memory's device to prepare a ragged read; its values are never
    checked (that reads the device): keep them in [1, N]. backward: plan the backward too
    (default: when an input requires grad); with return_lse=True, both backwards (with and
    without a gradient of lse). The backward's mode (dQ by atomics, or deterministic) is the
    one of the build.
    """
    if not all(isinstance(t, torch.Tensor) for t in (memory_key, memory_value)):
        raise TypeError("prepare_read takes memory_key and memory_value as tensors, not lists "
                        "of chunks (a fixed layout: concatenate them once)")
    if similarity not in ("dot", "l2"):
        raise ValueError(f"prepare_read takes similarity 'dot' or 'l2'; got {similarity!r}")
    call = inputs.prepared(query_key, memory_key, memory_value, scale=scale,
                           similarity=similarity, backend="triton", top_k=top_k)
    if memory_lengths is not None and not (
            isinstance(memory_lengths, torch.Tensor) and memory_lengths.dtype == torch.int32
            and tuple(memory_lengths.shape) == (memory_key.shape[0],)
            and memory_lengths.device == memory_key.device):
        raise ValueError(f"prepare_read: memory_lengths must be a (B={memory_key.shape[0]},) "
                         f"int32 tensor on {memory_key.device}; got "
                         f"{_described(memory_lengths)}")
    if call.backend != "triton":
        raise RuntimeError("prepare_read needs the Triton backend (the triton package)")
    from .backends.triton import backward_launcher, forward_launcher, selection_launchers
    q, k, v = call.q, call.keys[0], call.values[0]
    lengths = None if memory_lengths is None else memory_lengths
    layouts = dict(query_key=_Layout.of(query_key), memory_key=_Layout.of(memory_key),
                   memory_value=_Layout.of(memory_value))
    if memory_lengths is not None:
        layouts["memory_lengths"] = _Layout.of(memory_lengths)
    if backward is None:
        backward = any(t.requires_grad for t in (query_key, memory_key, memory_value))
    q, k, v = (t.detach() for t in (q, k, v))
    forward, backwards, select = None, {}, None
    with torch.no_grad():
        if call.top_k is not None:
            *_, select = selection_launchers.select_pass(q, k, call.top_k, call.scale, call.l2,
                                                         lengths)
        else:
            out, lse, forward = forward_launcher.forward_pass(q, k, v, call.scale, call.l2,
                                                              lengths)
            if backward:
                grad_out = torch.zeros_like(out)
                for with_lse in (False, True) if return_lse else (False,):
                    grad_lse = torch.zeros_like(lse) if with_lse else None
                    *_, backwards[with_lse] = backward_launcher.backward_pass(
                        grad_out, grad_lse, q, k, v, out, lse, call.scale, call.l2, lengths)
    return PreparedRead(layouts, call.query_spatial, call.scale, call.l2, call.top_k,
                        return_lse, forward, backwards, select)
