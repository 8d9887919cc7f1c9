"""XMem's (and Cutie's) memory similarity as a plain dot product over augmented channels.

XMem (Cheng & Schwing, ECCV 2022, `get_similarity`) scores a query position i against a memory
position j with an anisotropic L2 distance, a per-query channel selection e_i (in [0, 1]) and a
per-memory shrinkage s_j (>= 1):

    s_ij = -s_j / sqrt(Ck) * sum_c e_ic (q_ic - k_jc)^2
         = s_j / sqrt(Ck) * (2 sum_c e_ic q_ic k_jc - sum_c e_ic k_jc^2 - sum_c e_ic q_ic^2)

which is exactly q'_i . k'_j with 2 Ck + 1 channels:

    q'_i = [2 e_i * q_i, -e_i, -sum_c e_ic q_ic^2]        k'_j = s_j / sqrt(Ck) [k_j, k_j^2, 1]

The last channel is needed because the shrinkage multiplies the query's own term: it is a
per-query constant of the softmax only when s is constant, and the log-sum-exp (and so
merge_reads, usage and the sharded read) would be wrong without it. Without a selection
(XMem's STCN-like case) the similarity is s_j / sqrt(Ck) (2 q.k - |k|^2): q' = [2 q, -1 ... -1]
and k' = s_j / sqrt(Ck) [k, k^2], 2 Ck channels. Without a shrinkage s = 1. The augmentation
is differentiable, so gradients reach the query, the memory keys, the selection and the
shrinkage. It costs one (B, 2Ck+1, N) copy of the memory keys per read and twice the key
channels in the score product. The Triton kernels read 2 Ck + 1 = 257 channels (Ck = 128) on
256-wide tiles, the last channel as a rank-1 score term (backends/triton/calls.py).
"""
import torch


def _as_memory_chunks(shrinkage, keys):
    """shrinkage as chunks matching the (flattened) key chunks [(B, 1, N_i)]."""
    chunks = list(shrinkage) if isinstance(shrinkage, (list, tuple)) else [shrinkage]
    if len(chunks) == 1 and len(keys) > 1:
        sizes = [key.shape[2] for key in keys]
        if not isinstance(chunks[0], torch.Tensor) or chunks[0].flatten(2).shape[-1] != sum(sizes):
            chunks = chunks * 0  # caught below with the expected shape
        else:
            chunks = list(chunks[0].flatten(2).split(sizes, dim=2))
    if len(chunks) != len(keys):
        raise ValueError(f"shrinkage must have shape (B={keys[0].shape[0]}, 1, N) like the "
                         f"memory (or one chunk per memory_key chunk); got {len(chunks)} chunks "
                         f"for {len(keys)}")
    flat = []
    for index, (chunk, key) in enumerate(zip(chunks, keys, strict=True)):
        B, N = key.shape[0], key.shape[2]
        flat.append(_checked("shrinkage" if len(keys) == 1 else f"shrinkage[{index}]", chunk,
                             shapes=[(B, 1, N)], spatial_dims=None,
                             described=f"shape (B={B}, 1, N={N}) (or (B, 1, T, H, W)) to match "
                                       "the memory", like=key, owner="memory"))
    return flat


def _checked_selection(selection, q):
    Bq, Ck, HW = q.shape
    return _checked("selection", selection, shapes=[(1, Ck, HW), (Bq, Ck, HW)], spatial_dims=2,
                    described=f"the query's shape (Bq={Bq}, Ck={Ck}, HW={HW}) (or (Bq, Ck, H, W))",
                    like=q, owner="query")


def _checked(name, value, *, shapes, spatial_dims, described, like, owner):
    """value with its dimensions from the third on flattened into one (when it has up to
    2 + spatial_dims of them; None: any number), after checking that it is a floating-point
    tensor of one of the (flattened) shapes on like's device: TypeError or ValueError
    otherwise, saying that it `must have {described}`."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor; got "
                        f"{type(value).__name__}")
    flatten = value.dim() > 3 and (spatial_dims is None or value.dim() <= 2 + spatial_dims)
    flat = value.flatten(2) if flatten else value
    if tuple(flat.shape) not in shapes:
        raise ValueError(f"{name} must have {described}; got shape {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} must be on the {owner}'s device {like.device}; got "
                         f"{value.device}")
    return flat


def augment(q, keys, scale, shrinkage=None, selection=None):
    """(q', [k'_i]) with q' . k' = XMem's similarity times `scale` (1/sqrt(Ck) in XMem) for
    q (Bq, Ck, HW) and key chunks [(B, Ck, N_i)]; see the module docstring. The read then runs
    with similarity "dot" and scale 1."""
    dtype = keys[0].dtype
    shrinks = _as_memory_chunks(shrinkage, keys) if shrinkage is not None else [None] * len(keys)
    if selection is not None:
        e = _checked_selection(selection, q).to(dtype)
        q_aug = torch.cat([2 * e * q, -e.expand_as(q), -(e * q * q).sum(1, keepdim=True)], 1)
    else:
        q_aug = torch.cat([2 * q, -torch.ones_like(q)], 1)
    augmented = []
    for key, shrink in zip(keys, shrinks, strict=True):
        parts = [key, key * key]
        if selection is not None:
            parts.append(torch.ones_like(key[:, :1]))
        factor = scale if shrink is None else shrink.to(dtype) * scale
        augmented.append(torch.cat(parts, 1) * factor)
    return q_aug.contiguous(), augmented
