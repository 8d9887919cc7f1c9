"""The "torch" backend: the memory read in plain PyTorch with bounded memory. Online softmax
over memory chunks (forward), recomputation from the saved log-sum-exp (backward), a streaming
top-k selection and the memory usage, all chunked so that no (N x HW) affinity is ever held.
The CPU path, the fallback of the Triton backend, and the float64 path used by gradcheck."""
import concurrent.futures
import itertools
import os
import threading

import torch

from .. import torch_common
from .._buffers import new_buffer
from . import cpu_features
from ..torch_common import (LN2, LOG2E, accumulation_dtype, chunk_length, chunk_scores,
                            denormals_flushed, exp2_shifted_, floored_for_exp2_,
                            without_autocast)


def _per_object(q, lengths):
    """(object index, its query, its memory length) for a ragged memory, one object at a time."""
    for b, length in enumerate(lengths.tolist()):
        yield b, q[b:b + 1] if q.shape[0] > 1 else q, length


# Memory elements (objects x (Ck + Cv) x chunk) one batched chunk may copy (float32 copies of
# a 16-bit memory, contiguous key slices): 4 MB in float32, so that a short query's chunk,
# long by the score bound alone, does not copy a whole 16-bit memory at once.
COPY_ELEMENTS = 1 << 20


def _segments(lengths, HW, channels):
    """(start, stop, objects) chunks of a ragged memory: cut where an object's memory ends (the
    objects reading a chunk are then valid over all of it), at most a chunk's worth of scores
    and COPY_ELEMENTS of its `channels` (Ck + Cv) each. objects: the indices of the objects
    whose memory covers the chunk."""
    bounds = sorted(set(lengths) | {0})
    for low, high in itertools.pairwise(bounds):
        objects = [b for b, length in enumerate(lengths) if length >= high]
        step = min(chunk_length(len(objects), HW, high - low),
                   max(1, COPY_ELEMENTS // (len(objects) * channels)))
        for start in range(low, high, step):
            yield start, min(start + step, high), objects


def _rows(objects):
    """A slice when the objects are consecutive (views, in-place updates), else an index."""
    if objects[-1] - objects[0] + 1 == len(objects):
        return slice(objects[0], objects[-1] + 1)
    return torch.tensor(objects)


def _columns(memory, index, start, stop, dtype):
    """memory[index, :, start:stop] in dtype: a tensor's slice, or the slice of an 8-bit
    memory (quantized.DequantizingMemory) dequantised, only that slice widened."""
    if isinstance(memory, torch.Tensor):
        return memory[index, :, start:stop].to(dtype)
    return memory.columns(index, start, stop, dtype)


class _KeyChunks:
    """Object b's keys k[b, :, :n] (a tensor, or an 8-bit quantized.DequantizingMemory) as
    _bf16_softmax reads them: chunk `index` of _chunk_starts(n), bf16 (Ck + 2 or + 4, L): the
    keys, two rows of ones (against the query's offset columns), and for L2 two rows holding
    -|k|² split into a bf16 high part and the rest (about 16 bits in all). Each is made when
    taken, in one buffer reused for the next (one reader takes one chunk at a time): an 8-bit
    memory is dequantised a chunk at a time, and whatever the memory's length the products
    see one shape and layout (oneDNN makes a matmul primitive per shape and strides, and its
    cache and PyTorch's each keep up to 1,024 of them; a memory growing every frame would
    make new ones every frame)."""

    def __init__(self, k, b, n, l2, scratch):
        self.k, self.b, self.l2, self.scratch = k, b, l2, scratch
        self.starts = _chunk_starts(n)
        Ck, length = k.shape[1], min(n, CPU_CHUNK)
        self.shape = (len(self.starts), Ck + (4 if l2 else 2), length)
        self.keys = torch.empty(self.shape[1:], dtype=torch.bfloat16, device=k.device)
        self.keys[Ck:Ck + 2] = 1

    def __getitem__(self, index):
        Ck, length = self.k.shape[1], self.shape[2]
        start = self.starts[index]
        chunk = _chunk_into(self.k, self.b, start, start + length, self.keys[:Ck], self.scratch)
        if self.l2:
            norms = -chunk.float().square().sum(0)  # exact in float32
            high = norms.to(torch.bfloat16)
            self.keys[Ck + 2] = high
            self.keys[Ck + 3] = (norms - high.float()).to(torch.bfloat16)
        return self.keys


class _ValueChunks:
    """Object b's values v[b, :, :n] (a tensor, or an 8-bit quantized.DequantizingMemory) as
    _bf16_softmax reads them: a slice [:, start:stop] of at most CPU_CHUNK columns, bf16,
    under a row of ones, whose column of the product is the row sums (one more output column
    of the product costs far less than a pass summing the weights); made when taken in one
    buffer reused, as _KeyChunks's."""

    def __init__(self, v, b, n, scratch):
        self.v, self.b, self.scratch = v, b, scratch
        Cv, length = v.shape[1], min(n, CPU_CHUNK)
        self.shape = (Cv + 1, n)
        self.values = torch.empty((Cv + 1, length), dtype=torch.bfloat16, device=v.device)
        self.values[Cv] = 1

    def __getitem__(self, key):
        start, stop = key[1].start, key[1].stop
        _chunk_into(self.v, self.b, start, stop, self.values[:-1, :stop - start], self.scratch)
        return self.values[:, :stop - start]


def _chunk_into(memory, b, start, stop, out, scratch):
    """memory[b, :, start:stop] written into out (bf16) and returned: a tensor's copied, an
    8-bit memory's dequantised SCRATCH_CHANNELS channels at a time through scratch."""
    if isinstance(memory, torch.Tensor):
        return out.copy_(memory[b, :, start:stop])
    for low in range(0, out.shape[0], SCRATCH_CHANNELS):
        high = min(low + SCRATCH_CHANNELS, out.shape[0])
        memory.columns(b, start, stop, torch.bfloat16, out[low:high],
                       scratch[:high - low, :stop - start], slice(low, high))
    return out


def _scratch(k, v, n):
    """The float32 scratch an 8-bit memory's _KeyChunks and _ValueChunks widen their chunks
    in, SCRATCH_CHANNELS channels at a time (one reader's: one chunk part at a time); None
    for a memory of tensors."""
    if isinstance(k, torch.Tensor):  # (an 8-bit memory's keys and values are both wrapped)
        return None
    return torch.empty((min(max(k.shape[1], v.shape[1]), SCRATCH_CHANNELS), min(n, CPU_CHUNK)),
                       dtype=torch.float32, device=k.device)


@without_autocast
def forward(q, k, v, scale, l2, lengths=None):
    """(out (B, Cv, HW) in v's dtype, lse (B, HW)) for q (Bq, Ck, HW), k (B, Ck, N), v (B, Cv, N).

    lengths: optional (B,) valid memory positions per object: the work is proportional to the
    sum of the lengths and no position past an object's length is ever read. A large read on a
    CPU runs as row blocks (_forward_row_blocks: on worker threads, or for one object in bf16 on
    the caller's); elsewhere (a small read, a short query, or the fallback on a GPU) the memory
    is cut where an object's memory ends, and each chunk is one batched product over the
    objects whose memory covers it (consecutive objects through views, other subsets
    gathered).
    """
    if _row_blocks_pay(q, k, v, lengths):
        return _forward_row_blocks(q, k, v, scale, l2, lengths)
    return _forward_batched(q, k, v, scale, l2, lengths)


# Below this many multiply-adds (B·HW·N·(Ck + Cv)) a CPU read runs batched: the worker threads'
# hand-offs cost more than they save, and under it a busy core costs little in absolute time.
ROW_BLOCKS_MIN_WORK = 2 ** 27
# Below this many query rows per block a CPU read runs batched: a single-threaded product of so
# few rows runs far under the rate of torch's threaded one over all of them (a 112-position
# query on two threads: 56-row blocks).
ROW_BLOCKS_MIN_ROWS = 64


def _row_blocks_pay(q, k, v, lengths):
    """Whether forward runs as row blocks: on a CPU, with no gradient flowing through the ops
    (autograd cannot follow the worker threads' in-place updates), not inside torch.compile,
    and only for a read large enough to outweigh the threads' hand-offs, in blocks of at least
    ROW_BLOCKS_MIN_ROWS query rows."""
    if k.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    if _block_rows(q.shape[2], torch.get_num_threads()) < ROW_BLOCKS_MIN_ROWS:
        return False
    positions = k.shape[2] * k.shape[0] if lengths is None else int(lengths.sum())
    return positions * q.shape[2] * (k.shape[1] + v.shape[1]) >= ROW_BLOCKS_MIN_WORK


def _block_rows(HW, workers, limit=None):
    """Query rows per row block: blocks of at most `limit` rows (ROW_BLOCK), as many per object
    as a multiple of the workers."""
    limit = ROW_BLOCK if limit is None else limit
    per_worker = -(-HW // (workers * limit))
    return -(-HW // (workers * per_worker))


def _forward_batched(q, k, v, scale, l2, lengths):
    """forward as one batched product per memory chunk, over the objects whose memory covers it."""
    B, _, N = k.shape
    HW, Cv = q.shape[2], v.shape[1]
    acc_dtype = accumulation_dtype(v.dtype)
    ends = [N] * B if lengths is None else lengths.tolist()
    scale2 = scale * LOG2E  # base-2 scores (_online_step)
    # contiguous rows: a transposed left operand sends torch.matmul down a path 4x slower
    q_rows = (q.to(acc_dtype) * scale2).transpose(1, 2).contiguous()  # (Bq, HW, Ck)
    acc = torch.zeros((B, HW, Cv), dtype=acc_dtype, device=k.device)
    row_sum = torch.zeros((B, HW, 1), dtype=acc_dtype, device=k.device)
    row_max = torch.full((B, HW, 1), float("-inf"), dtype=acc_dtype, device=k.device)
    for start, stop, objects in _segments(ends, HW, k.shape[1] + Cv):
        rows = _rows(objects)
        if isinstance(rows, torch.Tensor):
            rows = rows.to(k.device)
        # contiguous: a strided chunk of a long memory makes the product ~1.5x slower on CPU
        k_chunk = _columns(k, rows, start, stop, acc_dtype).contiguous()
        v_rows = _columns(v, rows, start, stop, acc_dtype).transpose(1, 2)  # (objects, n, Cv)
        scores = chunk_scores(q_rows[rows] if q_rows.shape[0] > 1 else q_rows, k_chunk, scale2,
                              l2)
        stats = _online_step(scores, v_rows, row_max[rows], row_sum[rows], acc[rows])
        if isinstance(rows, slice):  # views: the sums were updated in place
            row_max[rows] = stats[0]
        else:
            row_max[rows], row_sum[rows], acc[rows] = stats
    out = acc.div_(row_sum).transpose(1, 2).to(v.dtype).contiguous()
    return out, (row_max * LN2 + torch.log(row_sum)).squeeze(2)


def _online_step(scores, values, row_max, row_sum, acc):
    """One chunk of an online softmax: base-2 scores (..., rows, n) (scaled by LOG2E; the
    weights are powers of two) and values (..., n, Cv) folded into the running row_max, row_sum
    (..., rows, 1) and acc (..., rows, Cv), which are rescaled where the maximum grows. Returns
    (row_max, row_sum, acc): the new maximum, and the sums updated in place (scores too is
    overwritten)."""
    new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))
    probabilities = exp2_shifted_(scores.sub_(new_max))
    alpha = torch.exp2(row_max - new_max)  # not in place: autograd may hold row_max
    row_sum.mul_(alpha).add_(probabilities.sum(-1, keepdim=True))
    acc.mul_(alpha)
    if acc.dim() == 2:
        acc.addmm_(probabilities, values)
    else:
        acc.baddbmm_(probabilities, values)
    return new_max, row_sum, acc


# The CPU forward's tasks: ROW_BLOCK query rows at most, stepping over CPU_CHUNK memory positions
# (a 512 x 1024 float32 score tile is 2 MB, held by one worker while it is reduced).
ROW_BLOCK = 512
# Tasks reading one group of row blocks on the bf16 path, each a share of the memory:
# two (not one per worker) bound the extra (Cv, rows) sums to one set per group.
READERS = 2
# Query rows of a block of a one-object bf16 read, which the caller reads with torch's own
# threads: 480p's 1,620 rows in one block, whose products are large enough for oneDNN to share
# out between the threads.
BF16_ROW_BLOCK = 2048
# Channels of an 8-bit key or value chunk widened to float32 at a time (a float32 scratch
# of 128 x CPU_CHUNK: 0.5 MiB a reader).
SCRATCH_CHANNELS = 128
CPU_CHUNK = 1024
_workers = {"pool": None, "size": 0, "pid": None}


def _worker_pool(size):
    """The worker threads of the CPU forward, each with a single-threaded torch (the count is
    per thread: the caller's stays as it is); made again after a fork, whose child has none of
    its parent's threads, or when torch's thread count changed."""
    if _workers["pool"] is None or _workers["size"] != size or _workers["pid"] != os.getpid():
        if _workers["pool"] is not None and _workers["pid"] == os.getpid():
            _workers["pool"].shutdown(wait=False)  # a count changed: its threads end when idle
        _workers.update(pool=concurrent.futures.ThreadPoolExecutor(
            size, thread_name_prefix="stm_kernels_read", initializer=torch.set_num_threads,
            initargs=(1,)), size=size, pid=os.getpid())
    return _workers["pool"]


def _forward_row_blocks(q, k, v, scale, l2, lengths):
    """forward on a CPU: tasks with single-threaded ops shared out to torch.get_num_threads()
    worker threads (the ops release the GIL), each a whole softmax of one block of query rows
    over its object's memory. The threads meet only when every task is done, so a core taken
    by another process slows its own thread, not every product of the read. Not
    differentiable by autograd (the op's backward is `backward`): forward takes the other path
    when gradients are to flow through it. On bf16 inputs, on a CPU with bf16 dot products
    (cpu_features), both products run in bf16 at twice the float32 rate (_bf16_softmax), the
    softmax in float32; there a task reads a group of row blocks over a share of the memory's
    chunks, each chunk made once (copied, or dequantised) for the whole group. A bf16 read of
    one object is the caller's own, one reader over every chunk with torch's threads: products
    over all its query rows at once keep the threads busy where single-threaded ones over a
    share of the rows did not (and the caller's OpenMP threads, which spin for a while after
    each parallel region, are then the ones working); several objects are faster read side by
    side by the workers."""
    B, Ck, N = k.shape
    HW, Cv = q.shape[2], v.shape[1]
    acc_dtype = accumulation_dtype(v.dtype)
    # bf16 inputs only: fp16 ones rounded to bf16 lose 3 bits each (1.2e-2 off a peaked
    # float32 read, against 5e-3 for bf16 inputs)
    bf16 = v.dtype == torch.bfloat16 and cpu_features.bf16_dot_products()
    ends = [N] * B if lengths is None else lengths.tolist()
    scale2 = scale * LOG2E  # base-2 scores (_fixed_offset_softmax)
    q_rows = (q.to(acc_dtype) * scale2).transpose(1, 2).contiguous()  # (Bq, HW, Ck)
    k_norms = None
    if l2:  # |k|² scaled, once per call (not once per row block)
        k_norms = torch.empty((B, N), dtype=acc_dtype)
        for start in range(0, N, CPU_CHUNK):
            chunk = _columns(k, slice(None), start, start + CPU_CHUNK, acc_dtype)
            k_norms[:, start:start + CPU_CHUNK] = chunk.square().sum(1).mul_(scale2)
    # bf16: summed as (Cv, rows) columns (_Bf16Rows), so the output needs no transposing copy
    out = new_buffer((B, Cv, HW) if bf16 else (B, HW, Cv), acc_dtype, "cpu")
    lse = new_buffer((B, HW), acc_dtype, "cpu")
    workers = torch.get_num_threads()
    own = bf16 and B == 1  # the caller reads the one object, with torch's threads
    rows = _block_rows(HW, 1, BF16_ROW_BLOCK) if own else _block_rows(HW, workers)

    def chunks(b, query):
        """(scores (rows, n), values (n, Cv)) of object b's memory, CPU_CHUNK positions each."""
        for start in range(0, ends[b], CPU_CHUNK):
            stop = min(start + CPU_CHUNK, ends[b])
            scores = query @ _columns(k, b, start, stop, acc_dtype)
            if l2:
                scores = scores.mul_(2).sub_(k_norms[b, start:stop])
            yield scores, _columns(v, b, start, stop, acc_dtype).T

    inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's

    def query_rows(b, first):
        return q_rows[b if q_rows.shape[0] > 1 else 0, first:first + rows]

    def finish(b, first, partial):
        """Object b's rows from first: their readers' sums merged, normalised and written."""
        acc, row_sum, offset = _merged(partial)
        # one sum, not isfinite's four passes: any inf or NaN makes it non-finite (a finite
        # acc whose sum overflows is only read again, with the same result)
        if not torch.isfinite(acc.sum() + row_sum.sum()):
            query = query_rows(b, first)
            acc, row_sum, offset = _online_softmax(chunks(b, query), query.shape[0], Cv,
                                                   acc_dtype)
            if bf16:  # as the bf16 sums are laid out: (Cv, rows), (1, rows)
                acc, row_sum, offset = acc.T, row_sum.T, offset.T
        target = out[b, :, first:first + rows] if bf16 else out[b, first:first + rows]
        if acc.data_ptr() == target.data_ptr() and acc.stride() == target.stride():
            acc.div_(row_sum)  # summed in place
        else:
            target.copy_(acc.div_(row_sum))
        lse[b, first:first + rows] = offset.add_(row_sum.log_()).reshape(-1)

    def float32_task(b, firsts):
        for first in firsts:
            finish(b, first, [_fixed_offset_softmax(chunks(b, query_rows(b, first)),
                                                    min(rows, HW - first), Cv, acc_dtype)])

    def bf16_task(b, firsts, reader, group):
        """One reader's sums of object b's row blocks at firsts, over the chunks it takes from
        the group's shared ones; the group's last reader to end merges and finishes them."""
        # the first reader sums into the output rows, the others into their own
        accs = [out[b, :, first:first + rows] if reader == 0 else
                torch.empty((Cv, min(rows, HW - first))) for first in firsts]
        scratch = _scratch(k, v, ends[b])
        results = _bf16_softmax(
            [q[b if q.shape[0] > 1 else 0, :, first:first + rows] for first in firsts],
            _KeyChunks(k, b, ends[b], l2, scratch), _ValueChunks(v, b, ends[b], scratch), scale,
            l2, accs, group["chunks"])
        with group["lock"]:
            group["results"].append(results)
            if len(group["results"]) < group["readers"]:
                return
        for j, first in enumerate(firsts):
            finish(b, first, [r[j] for r in group["results"] if r[j] is not None])

    def task(*arguments):
        # no_grad inside: inference_mode(False) turns gradients on
        with torch.inference_mode(inference), torch.no_grad():
            (bf16_task if bf16 else float32_task)(*arguments)

    starts = list(range(0, HW, rows))
    order = sorted(range(B), key=lambda b: -ends[b])  # the longest memories first
    tasks = []
    for b in order:
        if not bf16:  # one row block a task, over the whole memory
            tasks += [(b, [first]) for first in starts]
            continue
        # The bf16 path reads a group of row blocks in lockstep, each chunk taken once for
        # all of them (an 8-bit memory's dequantised once), by up to READERS tasks that take
        # the group's chunks as they come (a reader slowed by another process takes fewer)
        # and sum them apart, the last to end merging their sums; groups x readers tasks
        # make about one per worker.
        count = len(_chunk_starts(ends[b]))
        readers = 1 if own else min(READERS, workers, count)
        size = len(starts) if own else -(-len(starts) * readers // workers)  # blocks a group
        for i in range(0, len(starts), size):
            group = dict(chunks=_SharedIndices(count), readers=readers, results=[],
                         lock=threading.Lock())
            tasks += [(b, starts[i:i + size], reader, group) for reader in range(readers)]
    if workers == 1 or len(tasks) == 1:  # (a one-object bf16 read is one task)
        for t in tasks:
            task(*t)
    else:
        for done in [_worker_pool(workers).submit(task, *t) for t in tasks]:
            done.result()
    if bf16:
        return out.to(v.dtype), lse
    return out.transpose(1, 2).to(v.dtype).contiguous(), lse


class _SharedIndices:
    """The indices 0 to count - 1, each handed to one of the threads iterating over it."""

    def __init__(self, count):
        self.next, self.count, self.lock = 0, count, threading.Lock()

    def __iter__(self):
        return self

    def __next__(self):
        with self.lock:
            if self.next == self.count:
                raise StopIteration
            self.next += 1
            return self.next - 1


def _fixed_offset_softmax(chunks, rows, Cv, dtype):
    """(acc (rows, Cv), row_sum (rows, 1), offset (rows, 1)) of a softmax over the (base-2
    scores (rows, n), values (n, Cv)) chunks with one offset per row, the first chunk's
    maximum: 2^(scores - offset) summed and multiplied by the values, with no maximum to take
    and nothing to rescale in the later chunks (two of the online softmax's five passes over
    each chunk's scores); the offset is returned in natural units (times LN2), as the lse
    takes it. A later score that exceeds the offset by more than the accumulation dtype's
    exponent can hold (128 in float32) overflows: the result is then not finite, and the
    caller reads the rows again with _online_softmax."""
    acc = torch.zeros((rows, Cv), dtype=dtype)
    row_sum = torch.zeros((rows, 1), dtype=dtype)
    offset = None
    for scores, values in chunks:
        if offset is None:
            offset = scores.amax(1, keepdim=True)
        probabilities = exp2_shifted_(scores.sub_(offset))
        row_sum.add_(probabilities.sum(1, keepdim=True))
        acc.addmm_(probabilities, values)
    return acc, row_sum, offset * LN2


def _chunk_starts(n):
    """First positions of the CPU_CHUNK-long chunks a bf16 read takes of an n-position memory:
    every CPU_CHUNK-th, and for a length that is not a multiple the last CPU_CHUNK positions
    (overlapping the chunk before, whose positions it masks); one chunk of n below
    CPU_CHUNK."""
    starts = list(range(0, n - CPU_CHUNK + 1, CPU_CHUNK)) or [0]
    if n > CPU_CHUNK and n % CPU_CHUNK:
        starts.append(n - CPU_CHUNK)
    return starts


# A score may exceed its row's offset by this much (in score units) in a bf16 product: its
# output is then rounded by at most 2 * 2^-9 = 0.004, a 0.4% error in its softmax weight.
BF16_HEADROOM = 2.0


def _bf16_softmax(queries, keys, values, scale, l2, accs, indices):
    """[(acc (Cv, rows), row_sum (1, rows), offset (1, rows))]: _fixed_offset_softmax's sums
    laid out as columns (the output's (Cv, HW) layout), with both products in bf16 (float32
    accumulation inside oneDNN), for blocks of query rows of one object read in lockstep: each
    chunk's keys and values are taken once (an 8-bit memory's dequantised once) and multiplied
    by every block while they are in cache. queries: (Ck, rows) bf16 blocks; keys the object's
    _KeyChunks (chunks, Ck + 2 or + 4, L), the chunks at its `starts` (_chunk_starts(n)); values
    its _ValueChunks (Cv + 1, n), bf16, a row of ones last (the row sums come out of the second
    product), sliced a chunk at a time (a reader's buffers are reused for the next chunk); accs:
    a float32 (Cv, rows) buffer per block, which its acc is summed into (the caller's output
    columns: no copy); indices: the chunks to read (an iterable of indices into
    _chunk_starts(n): an iterator shared with other readers hands each chunk to one of them); a
    block's result is None where it yields none.

    A bf16 product rounds its output to 8 significant bits: 0.25 near a score of 50, a 13% error
    in its exp. So each row's offset is subtracted inside the product, through two extra query
    columns (the offset in a bf16 high and low part, about 16 bits) against the keys' rows of
    ones: the product is then near 0 where the softmax weight is, and exact there to bf16's
    relative precision. A chunk whose scores rise more than BF16_HEADROOM above a row's offset
    (every row at the first chunk: the offset starts at 0) raises that row's offset to the
    chunk's maximum, rescales the row's sums, and multiplies that row again: an online softmax
    whose maximum is taken from the product itself. The rounding of an offset is one constant
    per row, which the softmax cancels and the log-sum-exp takes back (the offset returned is
    the one subtracted). The scale multiplies the product inside it (addmm's alpha, on the
    float32 sum before its one rounding), so the query enters unrounded and no pass over the
    scores is spent on it; the scaled product and its exp round to about 2^-9 of an exponent
    near 0, and the row sums and the read-out accumulate in float32. Denormals are flushed to
    zero while it runs, as the bf16 dot-product instructions do in the products anyway, so that
    the exp of a peaked row's scores keeps to its fast path."""
    # one buffer for the blocks' value products, which run one after another
    Cv = accs[0].shape[0]
    partial = torch.empty((Cv + 1) * max(acc.shape[1] for acc in accs), dtype=torch.bfloat16)
    blocks = [_Bf16Rows(query, acc, partial[:(Cv + 1) * acc.shape[1]].view(Cv + 1, -1), scale,
                        l2) for query, acc in zip(queries, accs, strict=True)]
    length = keys.shape[2]
    with denormals_flushed():
        for index in indices:
            start = keys.starts[index]
            chunk_keys, chunk_values = keys[index], values[:, start:start + length]
            taken = index * length - start  # positions an earlier chunk read (the last overlaps)
            for block in blocks:
                block.add(chunk_keys, chunk_values, taken)
    return [None if block.subtracted is None else
            (block.acc, block.row_sum, block.subtracted.T * scale) for block in blocks]


class _Bf16Rows:
    """One block of query rows' sums in _bf16_softmax: its augmented query columns, the offset
    they subtract, and the float32 acc and row_sum the chunks are added into."""

    def __init__(self, query, acc, partial, scale, l2):
        rows = query.shape[1]
        self.scale = scale
        self.columns = [query.T * (2 if l2 else 1)]  # 2q: exact in bf16
        self.ones = [query.new_ones((rows, 2))] if l2 else []  # against -|k|² high and low
        self.augmented, self.used = self.augment(torch.zeros((rows, 1), dtype=torch.float32))
        self.unused = query.new_zeros((1, 1))  # addmm's input, ignored at beta = 0
        self.acc = acc.zero_()  # (Cv, rows)
        self.row_sum = torch.zeros((1, rows), dtype=torch.float32)
        self.partial = partial  # (Cv + 1, rows) bf16, the value product's
        self.subtracted = None

    def augment(self, target):
        """(the query's columns with -target in two bf16 parts (rows, Ck + 2 or + 4), the
        offset they subtract): made at the start and again at the first chunk (raise_offsets
        then changes only the rows whose offsets rise)."""
        high, low, offset = _bf16_parts(target)
        return torch.cat(self.columns + [-high, -low] + self.ones, 1), offset

    def product(self, keys, taken, rows=None):
        """scale * (query . keys - offset) for one chunk (of the query rows at index `rows`,
        default all), rounded once to bf16; -inf at the `taken` positions an earlier chunk
        read."""
        augmented = self.augmented if rows is None else self.augmented[rows]
        products = torch.addmm(self.unused.expand(augmented.shape[0], keys.shape[1]),
                               augmented, keys, beta=0, alpha=self.scale)
        if taken > 0:
            products[:, :taken] = float("-inf")
        return products

    def raise_offsets(self, products, keys, taken):
        """Where a row's products rise more than BF16_HEADROOM above its offset: its offset
        raised to its peak and its products taken again, for those rows only (in a chunk where
        some rows rise most do not, and a product of every row costs as much as the chunk's
        own). Returns None where no row rises, else the factor (1, rows), 1 but at those rows,
        that rescales the sums so far to the raised offsets as the chunk is added (in the add's
        own pass: gathering and scattering the rising rows' columns of the (Cv, rows) sums
        costs more)."""
        peak, rising = _rising_peak(products)
        if not rising.any():
            return None
        rows = rising.view(-1).nonzero().view(-1)
        before = self.used[rows]
        high, low, now = _bf16_parts(before + peak[rows] / self.scale)
        channels = self.columns[0].shape[1]
        self.augmented[rows, channels:channels + 2] = torch.cat([-high, -low], 1)
        products[rows] = self.product(keys, taken, _bucketed(rows, len(products)))[:len(rows)]
        self.used[rows] = now
        return torch.ones_like(self.row_sum).index_copy_(
            1, rows, torch.exp((before - now) * self.scale).T)

    def add(self, keys, values, taken):
        """Add one chunk: keys (Ck + 2 or + 4, L), values (Cv + 1, L) (ones last), bf16."""
        products = self.product(keys, taken)
        factor = None
        if self.subtracted is None:  # the first chunk: every row's offset set at its own peak
            peak = products.amax(1, keepdim=True).float()  # scaled
            self.augmented, self.used = self.augment(self.used + peak / self.scale)
            products = self.product(keys, taken)
            self.subtracted = self.used  # (raised in place from here on)
        else:
            factor = self.raise_offsets(products, keys, taken)
        # in bf16 (half the bytes of float32), its arguments floored: no denormal result
        probabilities = products.clamp_(min=BF16_EXP_FLOOR).exp_()
        # (Cv + 1, rows): the row sums last, the output's layout (no transposing copy at the end)
        torch.mm(values, probabilities.T, out=self.partial)
        if factor is None:
            self.acc.add_(self.partial[:-1])
            self.row_sum.add_(self.partial[-1:])
        else:  # sums * factor + partial, in one pass
            torch.addcmul(self.partial[:-1], self.acc, factor, out=self.acc)
            torch.addcmul(self.partial[-1:], self.row_sum, factor, out=self.row_sum)


def _bucketed(rows, limit):
    """The row indices `rows` padded to a power-of-two count (at most `limit`) by repeating the
    last: oneDNN makes a matmul primitive per shape, and a product of every count of rising rows
    would make (and cache) one for each."""
    count = min(1 << (len(rows) - 1).bit_length(), limit)
    return rows if count == len(rows) else torch.cat([rows, rows[-1:].expand(count - len(rows))])


def _bf16_parts(target):
    """(high, low, high + low) of float32 target: its bf16 part, the bf16 rest (about 16
    significant bits together), and their float32 sum (what a product subtracts)."""
    high = target.to(torch.bfloat16)
    low = (target - high.float()).to(torch.bfloat16)
    return high, low, high.float() + low.float()


# The floor of the bf16 exps' arguments: e^-87 is a normal number (float32's and bf16's smallest
# is about e^-87.3), and a denormal result takes exp's far slower path on threads that do not
# flush them (torch's OpenMP threads keep their own setting, not the caller's). A weight of
# e^-87 in place of a smaller one moves a row's sum (at least 1 once its peak is read) by at
# most N e^-87 of it.
BF16_EXP_FLOOR = -87.0


# bf16's bit patterns read as int16 order its non-negative values as the values (NaN above
# +inf), and put every negative value below them.
_HEADROOM_BITS = int(torch.tensor(BF16_HEADROOM, dtype=torch.bfloat16).view(torch.int16))


def _rising_peak(products):
    """(peak (rows, 1) float32, rising (rows, 1) bool) for bf16 products: rising where a row's
    maximum exceeds BF16_HEADROOM, peak that maximum where rising (elsewhere meaningless; a row
    holding a NaN may rise or not, its read is NaN either way). Taken on the products' int16
    view, whose order agrees with the values' above 0: an integer maximum, far cheaper than
    bf16's amax, which widens every element to float32."""
    top = products.view(torch.int16).amax(1, keepdim=True)
    return top.view(torch.bfloat16).float(), top > _HEADROOM_BITS


def _merged(partial):
    """One (acc, row_sum, offset) from the (acc, row_sum, offset) sums of disjoint parts of a
    memory (offsets in natural units): each rescaled to the largest offset and added."""
    if len(partial) == 1:
        return partial[0]
    offset = partial[0][2]
    for _, _, other in partial[1:]:
        offset = torch.maximum(offset, other)
    acc, row_sum = None, None
    for part_acc, part_sum, part_offset in partial:
        factor = torch.exp(part_offset - offset)
        if acc is None:
            acc, row_sum = part_acc.mul_(factor), part_sum.mul_(factor)
        else:
            acc.add_(part_acc.mul_(factor))
            row_sum.add_(part_sum.mul_(factor))
    return acc, row_sum, offset


def _online_softmax(chunks, rows, Cv, dtype):
    """_fixed_offset_softmax's result with a running maximum as the offset, each chunk's sums
    rescaled to it when it grows: finite for any finite scores."""
    row_max = torch.full((rows, 1), float("-inf"), dtype=dtype)
    acc = torch.zeros((rows, Cv), dtype=dtype)
    row_sum = torch.zeros((rows, 1), dtype=dtype)
    for scores, values in chunks:
        row_max, row_sum, acc = _online_step(scores, values, row_max, row_sum, acc)
    return acc, row_sum, row_max * LN2


@without_autocast
def backward(grad_out, grad_lse, q, k, v, out, lse, scale, l2, lengths=None):
    """(dq shaped like q, dk, dv) of the read, one memory chunk at a time; with lengths, one
    object at a time over its own positions (zero dk, dv past them)."""
    if lengths is not None:
        dq = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for b, q_b, length in _per_object(q, lengths):
            grads = backward(
                grad_out[b:b + 1], None if grad_lse is None else grad_lse[b:b + 1], q_b,
                k[b:b + 1, :, :length], v[b:b + 1, :, :length], out[b:b + 1], lse[b:b + 1],
                scale, l2)
            dq[b if q.shape[0] > 1 else 0] += grads[0][0]
            dk[b, :, :length], dv[b, :, :length] = grads[1][0], grads[2][0]
        return dq.to(q.dtype), dk, dv
    B, Ck, N = k.shape
    HW = q.shape[2]
    acc_dtype = accumulation_dtype(v.dtype)
    d_out = grad_out.to(acc_dtype)  # (B, Cv, HW)
    d_out_rows = d_out.transpose(1, 2).contiguous()  # (B, HW, Cv)
    delta = (d_out * out.to(acc_dtype)).sum(1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc_dtype)
    q_cols = q.to(acc_dtype)  # (Bq, Ck, HW)
    scale2 = scale * LOG2E  # base-2 scores and lse: the weights are powers of two
    q_rows = (q_cols.transpose(1, 2) * scale2).contiguous()
    lse = lse.to(acc_dtype).unsqueeze(2) * LOG2E
    delta = delta.unsqueeze(2)
    dq_rows = torch.zeros((B, HW, Ck), dtype=acc_dtype, device=k.device)
    dk = new_buffer((B, Ck, N), k.dtype, k.device)
    dv = new_buffer(v.shape[:2] + (N,), v.dtype, v.device)
    q_grad_scale = 2 * scale if l2 else scale
    chunk = chunk_length(B, HW, N)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        k_chunk = k[:, :, start:stop].to(acc_dtype).contiguous()
        v_chunk = v[:, :, start:stop].to(acc_dtype)
        # (B, HW, n)
        probabilities = exp2_shifted_(chunk_scores(q_rows, k_chunk, scale2, l2).sub_(lse))
        dv[:, :, start:stop] = torch.bmm(d_out, probabilities)
        d_scores = torch.bmm(d_out_rows, v_chunk).sub_(delta).mul_(probabilities)
        dk_chunk = torch.matmul(q_cols, d_scores).mul_(q_grad_scale)  # (B, Ck, n)
        if l2:
            dk_chunk.sub_(k_chunk * d_scores.sum(1, keepdim=True).mul_(2 * scale))
        dk[:, :, start:stop] = dk_chunk
        dq_rows.baddbmm_(d_scores, k_chunk.transpose(1, 2))
    dq = dq_rows.mul_(q_grad_scale).transpose(1, 2)
    if q.shape[0] == 1 and B > 1:
        dq = dq.sum(0, keepdim=True)
    return dq.to(q.dtype).contiguous(), dk, dv


# --------------------------------------------------------------------------- top-k selection


def exact_topk(scores, k):
    """(values, indices) of the k largest entries of each row of scores (..., n), sorted by
    value descending then index ascending: among equal values the lower indices are taken
    (torch.topk leaves that order unspecified). Ties at the k-th value are found from one more
    entry of the same torch.topk (a (k+1)-th equal to the k-th), not from a pass over the
    scores: that pass and its count took half the time of a streaming top-k read on a CPU."""
    tied = False
    if k < scores.shape[-1]:
        values, indices = torch.topk(scores, k + 1, dim=-1)
        tied = bool((values[..., k] == values[..., k - 1]).any())
        values, indices = values[..., :k], indices[..., :k]
    else:
        values, indices = torch.topk(scores, k, dim=-1)
    threshold = values[..., -1:]
    if tied:
        # ties at the threshold reach past the k kept: take the lowest indices among them
        greater, equal = scores > threshold, scores == threshold
        needed = k - greater.sum(-1, keepdim=True)
        take = greater | (equal & (equal.cumsum(-1) <= needed))
        indices = take.nonzero()[:, -1].view(*scores.shape[:-1], k)
        values = scores.gather(-1, indices)
    return _ordered(values, indices)


def _ordered(values, indices):
    """Sort by value descending, then index ascending."""
    by_index = torch.sort(indices, dim=-1).indices
    values, indices = values.gather(-1, by_index), indices.gather(-1, by_index)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(-1, order), indices.gather(-1, order)


def _merge(best, candidates):
    """The k best of two (values, indices) sets whose ties are all ordered by index, the first
    set holding the lower indices."""
    values = torch.cat([best[0], candidates[0]], -1)
    indices = torch.cat([best[1], candidates[1]], -1)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    order = order[..., :best[0].shape[-1]]
    return values.gather(-1, order), indices.gather(-1, order)


@without_autocast
def select(q, k, top_k, scale, l2, lengths=None):
    """(scores (B, HW, top_k), indices) of the top_k memory positions of each query, streaming
    over memory chunks (scores in the accumulation dtype; index -1 / score -inf where an object
    has fewer than top_k positions)."""
    B, _, N = k.shape
    HW = q.shape[2]
    acc_dtype = accumulation_dtype(k.dtype)
    q_rows = (q.to(acc_dtype) * scale).transpose(1, 2).contiguous()
    chunk = max(top_k, torch_common.CHUNK_ELEMENTS // max(B * HW, 1))
    best = None
    for start in range(0, N, chunk):
        k_chunk = _columns(k, slice(None), start, start + chunk, acc_dtype).contiguous()
        scores = chunk_scores(q_rows, k_chunk, scale, l2)  # (B, HW, n)
        if lengths is not None:
            positions = torch.arange(start, start + scores.shape[2], device=k.device)
            scores.masked_fill_((positions >= lengths[:, None])[:, None, :], float("-inf"))
        values, indices = exact_topk(scores, min(top_k, scores.shape[2]))
        found = (values, indices + start)
        best = found if best is None else _merge(best, found)
    return padded(*best, top_k)


def padded(values, indices, top_k):
    """Pad to top_k entries and mark entries past an object's memory (-inf) with index -1."""
    missing = top_k - values.shape[-1]
    if missing > 0:
        values = torch.cat([values, values.new_full(values.shape[:-1] + (missing,),
                                                    float("-inf"))], -1)
        indices = torch.cat([indices, indices.new_zeros(indices.shape[:-1] + (missing,))], -1)
    return values, torch.where(torch.isneginf(values), -1, indices)


# --------------------------------------------------------------------------- usage


@without_autocast
def usage(q, k, lse, scale, l2, lengths=None):
    """(B, N) float32 usage of the memory positions, one memory chunk at a time. The shifted
    scores s_ij - lse_i, in base 2, come out of one product over augmented channels (q' =
    log2(e) [scale q, -lse], k' = [k, 1]; for L2 q' = log2(e) [2 scale q, -scale, -lse], k' =
    [k, |k|^2, 1]), so each chunk costs one product, one exp2 and a sum over the queries."""
    B, Ck, N = k.shape
    HW = q.shape[2]
    acc_dtype = accumulation_dtype(k.dtype)
    lse = lse.to(acc_dtype)
    q_rows = q.to(acc_dtype).transpose(1, 2).expand(B, -1, -1)  # (B, HW, Ck)
    scale2 = scale * LOG2E
    columns = [q_rows * (2 * scale2 if l2 else scale2)]
    if l2:
        columns.append(q_rows.new_full((B, HW, 1), -scale2))
    q_aug = torch.cat(columns + [-LOG2E * lse.unsqueeze(2)], 2)  # (B, HW, Ck + 1 or 2)
    usage = torch.zeros((B, N), dtype=torch.float32, device=k.device)
    ones = q_aug.new_ones((B, 1, HW))
    chunk = chunk_length(B, HW, N)
    for start in range(0, N, chunk):
        k_chunk = _columns(k, slice(None), start, start + chunk, acc_dtype)
        n = k_chunk.shape[2]
        rows = [k_chunk] + ([k_chunk.square().sum(1, keepdim=True)] if l2 else [])
        k_aug = torch.cat(rows + [k_chunk.new_ones((B, 1, n))], 1)
        shifted = floored_for_exp2_(torch.bmm(q_aug, k_aug))  # (B, HW, n): log2(e) (s - lse)
        if lengths is not None and int(lengths.min()) < start + n:
            positions = torch.arange(start, start + n, device=k.device)
            shifted.masked_fill_((positions >= lengths[:, None])[:, None, :], float("-inf"))
        # a product with ones sums over the queries faster than .sum(1) on CPU
        usage[:, start:start + n] = torch.bmm(ones, shifted.exp2_()).squeeze(1)
    return usage


# --------------------------------------------------------------------------- forward mode


@without_autocast
def tangents(q, ks, vs, out, lse, dq, dks, dvs, scale, l2, lengths=None):
    """(d_out (B, Cv, HW) in out's dtype, d_lse (B, HW) in lse's dtype): the forward-mode
    derivative (jvp) of the read (out, lse) at q, memory chunks ks, vs, along the tangents dq,
    dks, dvs (None: zero), for every backend. With P = softmax(s) recomputed from lse and
    ds = d s along the tangents (dot: scale (dq.k + q.dk); l2: scale (2 (dq.k + q.dk) -
    2 k.dk)):

        d_lse_i = sum_j P_ij ds_ij
        d_out_i = sum_j P_ij (dv_j + ds_ij v_j) - d_lse_i out_i

    One pass over the memory in chunks of the backward's size (bounded memory, like the
    backward), accumulating out of place: the tangents may be batched by torch.func.vmap
    (jacfwd). Positions past lengths[b] are never read (they may hold anything)."""
    acc_dtype = accumulation_dtype(out.dtype)
    B, HW = lse.shape
    q_rows = q.to(acc_dtype).transpose(1, 2)  # (Bq, HW, Ck)
    dq_rows = None if dq is None else dq.to(acc_dtype).transpose(1, 2)
    lse_cols = lse.to(acc_dtype).unsqueeze(2)
    d_lse = weighted_dv = weighted_v = None
    first = 0  # the chunk's first position in the concatenated memory
    for k, v, dk, dv in zip(ks, vs, dks, dvs, strict=True):
        N = k.shape[2]
        step = chunk_length(B, HW, N)
        for start in range(0, N, step):
            stop = min(start + step, N)
            parts = [None if t is None else t[:, :, start:stop].to(acc_dtype)
                     for t in (k, v, dk, dv)]
            valid = None
            if lengths is not None:
                positions = torch.arange(first + start, first + stop, device=k.device)
                valid = (positions < lengths.unsqueeze(1)).unsqueeze(1)  # (B, 1, n)
                parts = [None if t is None else torch.where(valid, t, 0) for t in parts]
            k_part, v_part, dk_part, dv_part = parts
            scores = torch.matmul(q_rows, k_part)  # (B, HW, n)
            ds = None if dq_rows is None else torch.matmul(dq_rows, k_part)
            if dk_part is not None:
                ds = _plus(ds, torch.matmul(q_rows, dk_part))
            if l2:
                scores = 2 * scores - k_part.square().sum(1, keepdim=True)
                if ds is not None:
                    ds = 2 * ds
                if dk_part is not None:
                    ds = ds - 2 * (k_part * dk_part).sum(1, keepdim=True)
            scores = scores * scale
            if valid is not None:
                scores = scores.masked_fill(~valid, float("-inf"))
            probabilities = torch.exp(scores - lse_cols)
            if ds is not None:
                weighted = probabilities * (ds * scale)
                d_lse = _plus(d_lse, weighted.sum(2))
                weighted_v = _plus(weighted_v, torch.matmul(weighted, v_part.transpose(1, 2)))
            if dv_part is not None:
                weighted_dv = _plus(weighted_dv,
                                    torch.matmul(probabilities, dv_part.transpose(1, 2)))
        first += N
    out_rows = out.to(acc_dtype).transpose(1, 2)  # (B, HW, Cv)
    d_out = torch.zeros_like(out_rows) if weighted_dv is None else weighted_dv
    if d_lse is None:
        d_lse = torch.zeros_like(lse_cols.squeeze(2))
    else:
        d_out = d_out + weighted_v - d_lse.unsqueeze(2) * out_rows
    return d_out.transpose(1, 2).to(out.dtype), d_lse.to(lse.dtype)


def _plus(total, term):
    """total + term out of place (None: nothing yet)."""
    return term if total is None else total + term
