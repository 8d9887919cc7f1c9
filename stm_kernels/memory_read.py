"""`memory_read`: STM's space-time memory read as one differentiable op.

What happens to an input, in order:
    1. Under torch.autocast its floating inputs are cast to autocast's dtype, as for torch's
       scaled_dot_product_attention (inputs.autocast_inputs). Then
       `inputs.prepared` validates the tensors (shapes, dtypes, devices; errors name the
       argument and the expected shape) and views them as q (Bq, Ck, HW), k (B, Ck, N),
       v (B, Cv, N) without copying (spatial dims are merged as views where the strides allow,
       e.g. any slice of a preallocated memory bank along T; otherwise that tensor is copied).
       The XMem similarity becomes a dot product over augmented channels (xmem.py).
    2. `backends.resolve` picks the implementation (stm_kernels/backends).
    3. top_k: the k best positions per query are selected without gradients and the softmax
       is taken over them only (topk.py). Otherwise "naive" runs the official materialising
       read with PyTorch autograd; "triton" and "torch" go through the custom op
       `stm_kernels::memory_read`, whose autograd calls the custom op
       `stm_kernels::memory_read_backward` (both have fake implementations, so torch.compile
       traces them without graph breaks). In plain eager mode the same implementations are
       called directly (_fused_read): the custom op's dispatch costs tens of microseconds.
       Under torch.func transforms and forward-mode AD the read goes through
       _TransformedRead instead: the same forward and backward, a forward-mode rule
       (backends.pytorch.tangents) and a vmap rule; the top-k selection and the usage pass,
       which have no derivative, through _WithoutDerivatives.
    4. return_usage: one more pass over the memory from the read's lse (backends: usage).

Precision: all backends accumulate in float32 (float64 for float64 inputs). For float32
inputs on a GPU the Triton kernels follow `torch.set_float32_matmul_precision`: "highest" (the
PyTorch default) gives exact float32 products, "high"/"medium" allow TF32 tensor cores (about
1e-3 relative error, several times faster).
"""
from typing import Literal, Optional, Sequence, Union, overload

import torch
from torch.autograd import forward_ad

from . import backends, quantized, topk
from .backends.naive import naive_memory_read
from .inputs import concatenated, prepared
from .options import Backend, Similarity
from .torch_common import accumulation_dtype


# A memory is one tensor or a list of chunks read as their concatenation along N; a memory key
# or value may be (or hold) an 8-bit QuantizedMemory.
Memory = Union[torch.Tensor, quantized.QuantizedMemory,
               Sequence[Union[torch.Tensor, quantized.QuantizedMemory]]]
Lengths = Union[torch.Tensor, Sequence[int]]


@overload
def memory_read(query_key: torch.Tensor, memory_key: Memory, memory_value: Memory, *,
                scale: Optional[float] = ..., similarity: Similarity = ...,
                backend: Backend = ..., return_lse: Literal[False] = ...,
                memory_lengths: Optional[Lengths] = ..., top_k: Optional[int] = ...,
                return_usage: Literal[False] = ..., shrinkage: Optional[Memory] = ...,
                selection: Optional[torch.Tensor] = ...) -> torch.Tensor: ...


@overload
def memory_read(query_key: torch.Tensor, memory_key: Memory, memory_value: Memory, *,
                scale: Optional[float] = ..., similarity: Similarity = ...,
                backend: Backend = ..., return_lse: bool = ...,
                memory_lengths: Optional[Lengths] = ..., top_k: Optional[int] = ...,
                return_usage: bool = ..., shrinkage: Optional[Memory] = ...,
                selection: Optional[torch.Tensor] = ...
                ) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]: ...


def memory_read(query_key: torch.Tensor, memory_key: Memory, memory_value: Memory, *,
                scale: Optional[float] = None, similarity: Similarity = "dot",
                backend: Backend = "auto", return_lse: bool = False,
                memory_lengths: Optional[Lengths] = None, top_k: Optional[int] = None,
                return_usage: bool = False, shrinkage: Optional[Memory] = None,
                selection: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Space-time memory read: softmax attention of every query position over all memory positions.

    For each object b and query position i::

        out[b, :, i] = sum_j softmax_j(s_ij) * memory_value[b, :, j]
        s_ij = scale * q_i.k_j                    (similarity="dot", STM)
        s_ij = scale * (2 q_i.k_j - |k_j|^2)      (similarity="l2", STCN; -|q_i|^2 cancels)
        s_ij = -scale * shrinkage_j * sum_c selection_ic (q_ic - k_jc)^2   (similarity="xmem")

    computed in tiles: the (N x HW) affinity is never materialised (except by backend="naive").

    Args:
        query_key: (B or 1, Ck, HW) or (B or 1, Ck, H, W). Batch 1, or a stride-0 `expand`, is
            shared by all B objects without copies. float16, bfloat16, float32 or float64,
            the dtype of the memory (and of shrinkage and selection): mixed dtypes are a
            ValueError naming each argument's dtype, as for torch's
            scaled_dot_product_attention; the read never promotes, so cast explicitly (e.g.
            `query_key.to(memory_key.dtype)` against an fp16 memory bank). Under
            torch.autocast every floating input except float64 is first cast to autocast's
            dtype, as SDPA's are (out then comes back in that dtype).
        memory_key: (B, Ck, N) or (B, Ck, T, H', W'); B = objects, N = T*H'*W' positions.
            Or a list of such chunks (e.g. one per memory frame), read as their concatenation
            along N: autograd then saves the chunks themselves, not a concatenated copy, so a
            training loop that reads a growing list of memory frames keeps O(T) memory.
        memory_value: (B, Cv, *M) with the same memory layout *M as memory_key (chunk for
            chunk when memory_key is a list).
            Either (or any of their chunks) may be an 8-bit stm_kernels.QuantizedMemory (int8
            or fp8 with float32 scales): the read then runs in query_key's dtype (out in it),
            inference only, on backend "torch" (one chunk dequantised at a time; "auto") or
            "naive"; similarity "dot" or "l2" (stm_kernels/quantized.py).
        scale: score scale; defaults to 1/sqrt(Ck) (official STM, STCN, XMem). A finite
            Python number whose products overflow the compute dtype (float32, or the memory's
            dtype for "xmem") is a ValueError.
        similarity: "dot", "l2" or "xmem" (XMem/Cutie: an anisotropic L2 with `shrinkage`
            and `selection`, computed as a dot product over 2 Ck + 1 augmented channels; see
            stm_kernels/xmem.py).
        backend: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "torch"
            (chunked online softmax, bounded memory), "naive" (official materialising read) or
            "auto" (triton on CUDA for fp16/bf16/fp32, torch otherwise; exact float32 on
            NVIDIA, PyTorch's default matmul precision, reads with torch unless the GPU's
            architecture is known to be faster fused: docs/kernels.md, and
            STM_KERNELS_EXACT_FLOAT32=triton|torch decides it for every GPU).
        return_lse: also return the log-sum-exp of the scores.
        memory_lengths: optional (B,) integer tensor (or sequence of ints): object b reads only
            its first memory_lengths[b] memory positions, 1 <= length <= N (positions counted
            over the flattened N = T*H'*W', chunks concatenated), as in FlashAttention's varlen.
            The rest of the padded memory (e.g. a memory bank's unused capacity) is never
            read, may hold anything, and gets zero gradient. Checking the values costs one
            device synchronisation (skipped while torch.compile traces), refused under CUDA
            graph capture; a FixedCapacityMemory's lengths are checked where they are set,
            without one, and capture (with backend "triton" or "naive").
        top_k: softmax over each query's top_k largest scores only (STCN, XMem; ties go to the
            lower memory index); gradients flow through the selected positions only. Memory
            O(HW * top_k) beyond the inputs; backend "triton" supports top_k <= 64.
        return_usage: also return usage (B, N) float32, each memory position's probability
            summed over the query positions (XMem's memory usage; not differentiable).
        shrinkage: "xmem" only: (B, 1, N) or (B, 1, T, H', W') (per memory chunk when
            memory_key is a list), XMem's memory shrinkage s_j; None: 1.
        selection: "xmem" only: (Bq, Ck, HW) or (Bq, Ck, H, W) like query_key, XMem's query
            selection e_ic; None: XMem's STCN-like case without the query's own term.

    Returns:
        out (B, Cv, *Q) in memory_value's dtype; with return_lse=True also lse (B, *Q), the
        natural log of sum_j exp(s_ij), in float32 (float64 for float64 inputs); with
        return_usage=True also usage (B, N).
        Gradients flow to all three inputs (and through lse), to each chunk of a chunked
        memory, and to shrinkage and selection; torch.func (grad, jvp, vmap, jacrev, jacfwd)
        and forward-mode AD give the read's derivatives on every backend, and a second
        derivative of the fused backends is a one-line error (docs/op.md lists each). The
        triton backward adds dQ with atomics (not bitwise reproducible) unless
        torch.use_deterministic_algorithms(True) is set, when it computes dQ in a fixed order
        instead.
    """
    if quantized.is_quantized(memory_key) or quantized.is_quantized(memory_value):
        return quantized.read(query_key, memory_key, memory_value, scale=scale,
                              similarity=similarity, backend=backend, return_lse=return_lse,
                              memory_lengths=memory_lengths, top_k=top_k,
                              return_usage=return_usage, shrinkage=shrinkage,
                              selection=selection)
    call = prepared(query_key, memory_key, memory_value, scale=scale, similarity=similarity,
                    shrinkage=shrinkage, selection=selection, memory_lengths=memory_lengths,
                    backend=backend, top_k=top_k)
    if call.top_k is not None:
        k, v = concatenated(call.keys), concatenated(call.values)
        _, indices = _without_derivatives(backends.implementation(call.backend).select,
                                          call.q, k, call.top_k, call.scale, call.l2,
                                          call.lengths)
        out, lse, probabilities = topk.selected_read(call.q, k, v, indices, call.scale, call.l2)
        lse = lse.to(accumulation_dtype(v.dtype))
        memory_usage_ = _without_derivatives(_usage_of_selection, indices, probabilities,
                                             k.shape[2])[0] if return_usage else None
    else:
        if call.backend == "naive":
            out, lse = naive_memory_read(call.q, concatenated(call.keys),
                                         concatenated(call.values), call.scale, call.l2,
                                         need_lse=return_lse or return_usage,
                                         lengths=call.lengths)
        else:
            out, lse = _fused_read(call.q, call.keys, call.values, call.scale, call.l2,
                                   call.backend, call.lengths)
        memory_usage_ = _usage(call, lse.detach()) if return_usage else None
    results = [_query_shaped(out, 2, call.query_spatial)]
    if return_lse:
        results.append(_query_shaped(lse, 1, call.query_spatial))
    if return_usage:
        results.append(memory_usage_)
    return results[0] if len(results) == 1 else tuple(results)


def _query_shaped(tensor, dim, query_spatial):
    """tensor with its query dimension `dim` unflattened to the query's spatial shape; as it
    is for a (B, Ck, HW) query (unflatten is a Python function: a few microseconds a call)."""
    return tensor if len(query_spatial) == 1 else tensor.unflatten(dim, query_spatial)


def memory_usage(query_key: torch.Tensor, memory_key: Memory, lse: torch.Tensor, *,
                 scale: Optional[float] = None, similarity: Similarity = "dot",
                 shrinkage: Optional[Memory] = None, selection: Optional[torch.Tensor] = None,
                 memory_lengths: Optional[Lengths] = None,
                 backend: Backend = "auto") -> torch.Tensor:
    """Usage (B, N) float32 of the memory positions for a given log-sum-exp lse (B, *Q):
    sum over the query positions of exp(s_ij - lse_i), without gradients. For a read's own lse
    this is memory_read(..., return_usage=True)'s usage; with the lse of a read over a larger
    memory (e.g. merged across the shards of a sharded memory) it is this memory's share."""
    call = prepared(query_key, memory_key, memory_key, scale=scale, similarity=similarity,
                    shrinkage=shrinkage, selection=selection, memory_lengths=memory_lengths,
                    backend=backend)
    B, HW = call.keys[0].shape[0], call.q.shape[2]
    if not isinstance(lse, torch.Tensor) or lse.shape[0] != B or lse[0].numel() != HW:
        raise ValueError(f"lse must have shape (B={B}, *Q) with {HW} query positions; got "
                         f"{getattr(lse, 'shape', type(lse).__name__)}")
    return _usage(call, lse.reshape(B, HW).to(call.q.device))


def _usage(call, lse):
    """The usage (B, N) float32 of a prepared call's memory for the log-sum-exp lse (B, HW):
    one more pass over the memory that recomputes the scores without storing them (see
    backends: torch chunked, Triton one program per memory block, naive materialised). Not
    differentiable: XMem and Cutie use usage as a statistic, not in the loss."""
    return _without_derivatives(_usage_pass, call.q, concatenated(call.keys), lse, call.scale,
                                call.l2, call.lengths, call.backend)[0]


def _usage_pass(q, k, lse, scale, l2, lengths, backend):
    return (backends.implementation(backend).usage(q, k, lse, scale, l2, lengths),)


def _usage_of_selection(indices, probabilities, N):
    return (topk.usage_of_selection(indices, probabilities, N),)


# --------------------------------------------------------------------------- dispatch


def _fused_read(q, ks, vs, scale, l2, backend, lengths):
    """(out, lse) of a "triton" or "torch" read. Under a torch.func transform or forward-mode
    AD (dual tensors), _TransformedRead, which gives each its rule; the custom op wherever
    torch's machinery has to see one op (torch.compile, torch.jit.trace, fake or subclass
    tensors, dispatch and function modes); otherwise the same implementation called directly,
    through _FusedRead when gradients flow: the custom op's eager dispatch costs 30-110 us a
    call (a list-of-tensors schema takes torch's slow path), as long as the GPU read of ten
    memory frames (docs/performance.md)."""
    transformed = _transformed()
    if transformed:
        read = _TransformedRead.apply if transformed == "eager" else _transformed_outside_compile
        return read(scale, l2, backend, lengths, len(ks), q, *ks, *vs)
    tensors = (q, *ks, *vs) if lengths is None else (q, *ks, *vs, lengths)
    if not _plain_eager(tensors):
        return torch.ops.stm_kernels.memory_read(q, ks, vs, scale, l2, backend, lengths)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FusedRead.apply(scale, l2, backend, lengths, len(ks), q, *ks, *vs)
    return _forward(q, ks, vs, scale, l2, backend, lengths)


def _forward(q, ks, vs, scale, l2, backend, lengths):
    """The backend's (out, lse) over the memory chunks, concatenated only here (transiently):
    the custom op's implementation and the eager route's."""
    return backends.implementation(backend).forward(q, concatenated(ks), concatenated(vs), scale,
                                                    l2, lengths)


def _backward(grad_out, grad_lse, q, ks, vs, out, lse, scale, l2, backend, lengths):
    """The backend's (dq, dk, dv), dk and dv over the concatenated memory: the eager route's
    backward, and the backward custom op's before it makes them contiguous."""
    return backends.implementation(backend).backward(
        grad_out, grad_lse, q, concatenated(ks), concatenated(vs), out, lse, scale, l2, lengths)


def _chunk_gradients(dq, dk, dv, ks):
    """(dq, [dk per memory chunk], [dv per memory chunk]) of gradients over the whole memory."""
    if len(ks) == 1:  # one chunk: the gradients as they are (split costs a Python call)
        return dq, [dk], [dv]
    sizes = [k.shape[2] for k in ks]
    return dq, list(dk.split(sizes, dim=2)), list(dv.split(sizes, dim=2))


def _plain_eager(tensors):
    """Whether a call runs in plain eager mode on plain tensors: nothing (compiler, mode,
    transform, subclass, meta tensor) that must see the custom op instead of its insides."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or \
            torch._C._are_functorch_transforms_active() or \
            torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return False
    return all(type(t) is torch.Tensor and not t.is_meta for t in tensors)


def _transformed():
    """Whether the read goes through _TransformedRead: "eager" under a torch.func transform
    (grad, vjp, jvp, vmap, jacrev, jacfwd) or forward-mode AD (inside a
    `torch.autograd.forward_ad.dual_level`), "outside compile" for forward-mode AD while
    torch.compile traces (torch.func.jvp inside a compiled function, dual tensors passed to
    one); else False. The custom op has no forward-mode rule (torch.library offers no way to
    register one: it would return a zero tangent, without an error) and its autograd does not
    run under torch.func; torch.compile traces grad and vmap through the custom op, and runs
    a forward-mode read in eager mode (_transformed_outside_compile)."""
    if forward_ad._current_level >= 0:
        if torch.jit.is_tracing():
            return False
        return "outside compile" if torch.compiler.is_compiling() else "eager"
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling() \
            and not torch.jit.is_tracing():
        return "eager"
    return False


class _FusedRead(torch.autograd.Function):
    """The custom op's autograd without its dispatch, in plain eager mode: the backend's
    forward, and its backward (the backward custom op under create_graph=True, whose own
    autograd refuses a second derivative in one line). Written in the old style (ctx in
    forward), which torch.func does not take (_TransformedRead serves it): a Function with
    setup_context binds its arguments with inspect.signature on every call."""

    @staticmethod
    def forward(ctx, scale, l2, backend, lengths, chunks, q, *memory):
        out, lse = _forward(q, memory[:chunks], memory[chunks:], scale, l2, backend, lengths)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        # what _setup_context saves (memory: the key chunks, then the value chunks)
        ctx.save_for_backward(q, out, lse, lengths, *memory)
        ctx.chunks, ctx.options = chunks, (scale, l2, backend)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if grad_out is None and grad_lse is None:  # one None per input of forward
            memory_chunks = len(ctx.saved_tensors) - 4  # saved after q, out, lse, lengths
            return (None,) * (6 + memory_chunks)
        # under create_graph=True the backward custom op, whose autograd refuses a second one
        backward = torch.ops.stm_kernels.memory_read_backward if torch.is_grad_enabled() \
            else _backward
        dq, dk, dv = _saved_gradients(ctx, grad_out, grad_lse, backward)
        return (None,) * 5 + (dq, *dk, *dv)


# --------------------------------------------------------------------------- torch.func


class _TransformedRead(torch.autograd.Function):
    """The fused read under torch.func transforms and forward-mode AD: forward and backward
    are the backends' (on the transforms' plain tensors), jvp is the forward-mode rule
    (backends.pytorch.tangents: one more chunked pass over the memory, for every backend),
    vmap folds the mapped dimension into the objects B (or, when only the query is mapped,
    into the query positions HW) and reads once."""

    @staticmethod
    def forward(scale, l2, backend, lengths, chunks, q, *memory):
        return _forward(q, list(memory[:chunks]), list(memory[chunks:]), scale, l2, backend,
                        lengths)

    @staticmethod
    def setup_context(ctx, inputs, output):
        scale, l2, backend, lengths, chunks, q, *memory = inputs
        ctx.set_materialize_grads(False)
        _setup_context(ctx, (q, memory[:chunks], memory[chunks:], scale, l2, backend, lengths),
                       output)
        ctx.save_for_forward(q, *output, lengths, *memory)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        chunks = ctx.chunks
        if grad_out is None and grad_lse is None:
            return (None,) * (6 + 2 * chunks)
        dq, dk, dv = _saved_gradients(ctx, grad_out, grad_lse, _transformed_backward)
        return (None,) * 5 + (dq, *dk, *dv)

    @staticmethod
    def jvp(ctx, _scale, _l2, _backend, _lengths, _chunks, dq, *d_memory):
        q, out, lse, lengths, *memory = ctx.saved_tensors
        chunks = ctx.chunks
        scale, l2, _ = ctx.options
        return backends.pytorch.tangents(q, memory[:chunks], memory[chunks:], out, lse, dq,
                                         d_memory[:chunks], d_memory[chunks:], scale, l2,
                                         lengths)

    @staticmethod
    def vmap(info, in_dims, scale, l2, backend, lengths, chunks, q, *memory):
        q_dim, memory_dims = in_dims[5], in_dims[6:]
        if in_dims[3] is None and all(d is None for d in memory_dims):
            # only the query is mapped: its V x HW positions read the one memory
            V, HW = info.batch_size, q.shape[-1]
            q = q.movedim(q_dim, 2).flatten(2)  # (Bq, Ck, V*HW)
            out, lse = _TransformedRead.apply(scale, l2, backend, lengths, chunks, q, *memory)
            return (out.unflatten(2, (V, HW)), lse.unflatten(1, (V, HW))), (2, 1)
        V = info.batch_size
        B = _unmapped_shape(memory[0], memory_dims[0])[0]
        if q_dim is not None or q.shape[0] != 1:  # (an unmapped batch-1 query stays shared)
            q = _objects_folded(q, q_dim, V, B)
        memory = [_objects_folded(t, d, V) for t, d in zip(memory, memory_dims, strict=True)]
        lengths = _lengths_folded(lengths, in_dims[3], V)
        out, lse = _TransformedRead.apply(scale, l2, backend, lengths, chunks, q, *memory)
        return (out.unflatten(0, (V, B)), lse.unflatten(0, (V, B))), (0, 0)


@torch.compiler.disable
def _transformed_outside_compile(*args):
    """_TransformedRead.apply(*args) run eagerly by torch.compile (a graph break; an error under
    fullgraph=True), where its forward-mode rule applies."""
    return _TransformedRead.apply(*args)


def _unmapped_shape(tensor, dim):
    """The shape of one map index of tensor, mapped along dim (None: not mapped)."""
    return tensor.shape if dim is None else tensor.shape[:dim] + tensor.shape[dim + 1:]


def _objects_folded(tensor, dim, V, objects=None):
    """tensor (objects-first; mapped along dim, or None: the same for every map index) as
    (V * objects, ...): the map index folded into the objects. objects: a query's B, to which
    a shared (batch 1) query is expanded; None: the tensor's own first dimension."""
    tensor = tensor.unsqueeze(0).expand(V, *tensor.shape) if dim is None else \
        tensor.movedim(dim, 0)
    if objects is not None and tensor.shape[1] != objects:
        tensor = tensor.expand(V, objects, *tensor.shape[2:])
    return tensor.flatten(0, 1)


def _lengths_folded(lengths, dim, V):
    if lengths is None:
        return None
    return lengths.repeat(V) if dim is None else lengths.movedim(dim, 0).flatten()


def _transformed_backward(grad_out, grad_lse, q, ks, vs, out, lse, scale, l2, backend, lengths):
    """The backend's (dq, dk, dv) through _TransformedBackward, so that the backward too runs
    under vmap (jacrev) and a second derivative is refused in one line."""
    return _TransformedBackward.apply(scale, l2, backend, lengths, len(ks), grad_out, grad_lse,
                                      q, out, lse, *ks, *vs)


class _TransformedBackward(torch.autograd.Function):
    """_TransformedRead's backward as a function of its own: the backend's backward, a vmap
    rule folding the mapped dimension into the objects, and one-line refusals of a second
    derivative (reverse or forward mode)."""

    @staticmethod
    def forward(scale, l2, backend, lengths, chunks, grad_out, grad_lse, q, out, lse, *memory):
        return _backward(grad_out, grad_lse, q, list(memory[:chunks]), list(memory[chunks:]),
                         out, lse, scale, l2, backend, lengths)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_UNSUPPORTED)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(DOUBLE_BACKWARD_UNSUPPORTED)

    @staticmethod
    def vmap(info, in_dims, scale, l2, backend, lengths, chunks, grad_out, grad_lse, q, out,
             lse, *memory):
        V = info.batch_size
        B = _unmapped_shape(out, in_dims[8])[0]
        shared = _unmapped_shape(q, in_dims[7])[0] == 1 and B > 1
        grad_out, out, lse, *memory = [
            _objects_folded(t, d, V) for t, d in zip((grad_out, out, lse, *memory),
                                                     in_dims[5:6] + in_dims[8:], strict=True)]
        if grad_lse is not None:
            grad_lse = _objects_folded(grad_lse, in_dims[6], V)
        q = _objects_folded(q, in_dims[7], V, B)
        lengths = _lengths_folded(lengths, in_dims[3], V)
        dq, dk, dv = _TransformedBackward.apply(scale, l2, backend, lengths, chunks, grad_out,
                                                grad_lse, q, out, lse, *memory)
        dq = dq.unflatten(0, (V, B))
        if shared:  # the query was shared by the objects: its gradient is their sum
            dq = dq.sum(1, keepdim=True)
        return (dq, dk.unflatten(0, (V, B)), dv.unflatten(0, (V, B))), (0, 0, 0)


def _without_derivatives(function, *args):
    """function(*args) -> a tuple of tensors that carry no derivative (a top-k selection, a
    usage pass), without gradients. Under torch.func transforms and forward-mode AD (which
    no_grad does not stop) it runs inside _WithoutDerivatives, which hands it the transforms'
    plain tensors (the Triton kernels cannot read functorch's wrappers), gives its outputs no
    tangent, and maps it under vmap one index at a time."""
    if (torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0) and \
            not torch.compiler.is_compiling():
        return _WithoutDerivatives.apply(function, *args)
    with torch.no_grad():
        return function(*args)


class _WithoutDerivatives(torch.autograd.Function):
    """forward(function, *args) = function(*args) under no_grad, its outputs marked
    non-differentiable (no gradient, no tangent); vmap calls it once per map index."""

    @staticmethod
    def forward(function, *args):
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)
        ctx.outputs = len(output)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * (len(ctx.needs_input_grad))

    @staticmethod
    def jvp(ctx, *tangents):
        return (None,) * ctx.outputs

    @staticmethod
    def vmap(info, in_dims, function, *args):
        results = [_WithoutDerivatives.apply(function, *(
            t if d is None else t.select(d, index)
            for t, d in zip(args, in_dims[1:], strict=True))) for index in range(info.batch_size)]
        return tuple(torch.stack(parts) for parts in zip(*results, strict=True)), 0


# --------------------------------------------------------------------------- custom ops


# The ops take the memory as a list of chunks and concatenate it only transiently, inside the
# forward and inside the backward: autograd saves the chunks themselves, so reading a growing
# list of memory frames at every step of a clip keeps O(T) memory alive, not O(T^2) copies.
@torch.library.custom_op("stm_kernels::memory_read", mutates_args=())
def _memory_read_op(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                    scale: float, l2: bool, backend: str,
                    lengths: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if forward_ad._current_level >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in (q, *ks, *vs)):
        raise RuntimeError(FORWARD_MODE_UNSUPPORTED)
    return _forward(q, ks, vs, scale, l2, backend, lengths)


@_memory_read_op.register_fake
def _(q, ks, vs, scale, l2, backend, lengths):
    B, Cv, HW = ks[0].shape[0], vs[0].shape[1], q.shape[2]
    return (vs[0].new_empty((B, Cv, HW)),
            vs[0].new_empty((B, HW), dtype=accumulation_dtype(vs[0].dtype)))


@torch.library.custom_op("stm_kernels::memory_read_backward", mutates_args=())
def _memory_read_backward_op(
        grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor,
        ks: list[torch.Tensor], vs: list[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
        scale: float, l2: bool, backend: str,
        lengths: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) with dk, dv over the concatenated memory (split per chunk by autograd)."""
    dq, dk, dv = _backward(grad_out, grad_lse, q, ks, vs, out, lse, scale, l2, backend, lengths)
    # contiguous, as the fake below promises (torch.compile asserts the strides): the Triton
    # backward may return dq as a view of a buffer padded to its query block
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_memory_read_backward_op.register_fake
def _(grad_out, grad_lse, q, ks, vs, out, lse, scale, l2, backend, lengths):
    N = sum(k.shape[2] for k in ks)
    return (q.new_empty(q.shape), ks[0].new_empty(ks[0].shape[:2] + (N,)),
            vs[0].new_empty(vs[0].shape[:2] + (N,)))


def _setup_context(ctx, inputs, output):
    q, ks, vs, scale, l2, backend, lengths = inputs
    out, lse = output
    ctx.save_for_backward(q, out, lse, lengths, *ks, *vs)
    ctx.chunks = len(ks)
    ctx.options = (scale, l2, backend)


def _saved_gradients(ctx, grad_out, grad_lse, backward):
    """(dq, [dk per chunk], [dv per chunk]) by backward(...) (the backward custom op, or
    _backward) from what _setup_context saved."""
    q, out, lse, lengths, *memory = ctx.saved_tensors
    ks, vs = memory[:ctx.chunks], memory[ctx.chunks:]
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    return _chunk_gradients(*backward(grad_out, grad_lse, q, ks, vs, out, lse, *ctx.options,
                                      lengths), ks)


def _op_backward(ctx, grad_out, grad_lse):
    return _saved_gradients(ctx, grad_out, grad_lse,
                            torch.ops.stm_kernels.memory_read_backward) + (None,) * 4


_memory_read_op.register_autograd(_op_backward, setup_context=_setup_context)

FORWARD_MODE_UNSUPPORTED = (
    "forward-mode AD (dual tensors) through the custom op stm_kernels::memory_read is not "
    "supported (torch.library gives it no forward-mode rule; its tangent would be zero): call "
    "stm_kernels.memory_read, whose forward-mode rule runs under torch.func.jvp and "
    "torch.autograd.forward_ad")

DOUBLE_BACKWARD_UNSUPPORTED = (
    "double backward (higher-order gradients) of stm_kernels.memory_read is not supported by "
    "its fused backends ('triton', 'torch'); backend='naive' (the materialising read, plain "
    "PyTorch autograd) supports it")


def _setup_backward_context(ctx, inputs, output):
    pass


def _double_backward(ctx, grad_dq, grad_dk, grad_dv):
    """The backward of the backward: refused in one line (without it, torch's own error says
    only that no autograd formula was registered)."""
    raise RuntimeError(DOUBLE_BACKWARD_UNSUPPORTED)


# Reached only when the first backward built a graph (create_graph=True) and that graph is
# differentiated again.
_memory_read_backward_op.register_autograd(_double_backward,
                                           setup_context=_setup_backward_context)
