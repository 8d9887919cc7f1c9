"""FixedCapacityMemory: storage of a fixed capacity with each object's length held on the device,
checked on the host where it is set. What must hold, for the torch and triton backends (the
kernels in the interpreter): a read sees each object's first lengths[b] positions only (the
unused capacity NaN-poisoned), against a float64 read written here in plain torch; lengths
changed between reads take effect without new storage, a new plan or a device read; the
gradients are the prefix's and zero on the tail; lengths changed behind the object's back are
checked again; under a CUDA graph capture (the capture check patched: no GPU here) a plain
tensor's lengths are refused in one line and the object's are read.
"""
import pytest
import torch

from stm_kernels import FixedCapacityMemory, memory_read, memory_usage
from stm_kernels.backends.triton import devices

NAN = float("nan")
B, CK, CV, HW, CAPACITY = 2, 8, 12, 5, 40
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not devices.INTERPRETING and not torch.cuda.is_available(), reason="needs Triton"))]


def _reference(q, k, v, lengths, scale=None, l2=False):
    """(out (B, Cv, HW), lse (B, HW)) in float64 of object b's first lengths[b] positions:
    einsum and softmax, nothing of the project's."""
    outs, lses = [], []
    for b, length in enumerate(lengths):
        qb = q[b if q.shape[0] > 1 else 0].double()
        kb, vb = k[b, :, :length].double(), v[b, :, :length].double()
        s = scale if scale is not None else CK ** -0.5
        scores = s * torch.einsum("cn,ci->ni", kb, qb)
        if l2:
            scores = 2 * scores - s * (kb * kb).sum(0)[:, None]
        outs.append(torch.einsum("cn,ni->ci", vb, torch.softmax(scores, dim=0)))
        lses.append(torch.logsumexp(scores, dim=0))
    return torch.stack(outs), torch.stack(lses)


def _memory(seed=0, lengths=(13, 30)):
    """A memory holding random positions up to each object's length, NaN past it."""
    generator = torch.Generator().manual_seed(seed)
    memory = FixedCapacityMemory.empty(B, CK, CV, CAPACITY, fill=NAN)
    keys = torch.randn(B, CK, CAPACITY, generator=generator)
    values = torch.randn(B, CV, CAPACITY, generator=generator)
    for b, length in enumerate(lengths):
        memory.keys[b, :, :length] = keys[b, :, :length]
        memory.values[b, :, :length] = values[b, :, :length]
    memory.set_lengths(list(lengths))
    return memory


def _query(seed=1, objects=1):
    return torch.randn(objects, CK, HW, generator=torch.Generator().manual_seed(seed))


def _close(actual, expected, atol=2e-5):
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_a_read_sees_each_objects_first_lengths_positions(backend, similarity):
    memory = _memory()
    q = _query()
    out, lse = memory.read(q, backend=backend, similarity=similarity, return_lse=True)
    expected, expected_lse = _reference(q, memory.keys, memory.values, (13, 30),
                                        l2=similarity == "l2")
    _close(out, expected)
    _close(lse, expected_lse)
    assert memory.host_lengths == (13, 30) and memory.lengths.tolist() == [13, 30]


@pytest.mark.parametrize("backend", BACKENDS)
def test_appended_frames_are_read_after_each_append(backend):
    generator = torch.Generator().manual_seed(4)
    memory = FixedCapacityMemory.empty(B, CK, CV, CAPACITY, fill=NAN)
    q = _query(objects=B)
    frames = [(torch.randn(B, CK, 2, 3, generator=generator),
               torch.randn(B, CV, 2, 3, generator=generator)) for _ in range(4)]
    for index, (keys, values) in enumerate(frames):
        memory.append(keys, values)
        length = 6 * (index + 1)
        assert memory.host_lengths == (length, length)
        k = torch.cat([keys.flatten(2) for keys, _ in frames[:index + 1]], dim=2)
        v = torch.cat([values.flatten(2) for _, values in frames[:index + 1]], dim=2)
        _close(memory.read(q, backend=backend), _reference(q, k, v, (length, length))[0])
    assert memory.keys[:, :, 24:].isnan().all() and memory.values[:, :, 24:].isnan().all()


def test_append_writes_after_ragged_lengths():
    memory = FixedCapacityMemory.empty(B, CK, CV, CAPACITY, fill=NAN)
    memory.set_lengths([3, 7])
    keys, values = torch.randn(B, CK, 4), torch.randn(B, CV, 4)
    memory.append(keys, values)
    assert memory.host_lengths == (7, 11) and memory.lengths.tolist() == [7, 11]
    assert torch.equal(memory.keys[0, :, 3:7], keys[0])
    assert torch.equal(memory.keys[1, :, 7:11], keys[1])
    assert torch.equal(memory.values[1, :, 7:11], values[1])
    assert memory.keys[0, :, 7:].isnan().all() and memory.keys[1, :, 11:].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_changed_between_reads_need_no_new_storage_plan_or_device_read(
        backend, plannings, monkeypatch):
    """One memory read at four lengths, including the whole capacity: the same storage and
    lengths tensors, the triton read planned once, no Tensor.item (the per-call check's device
    read), and each read equal to the float64 read of the prefix."""
    from stm_kernels.backends.triton import kept_launches, running
    monkeypatch.setattr(running, "_chosen", {})
    monkeypatch.setattr(kept_launches, "_prepared", {})
    generator = torch.Generator().manual_seed(2)
    memory = FixedCapacityMemory.empty(B, CK, CV, CAPACITY, fill=NAN)
    memory.append(torch.randn(B, CK, CAPACITY, generator=generator),
                  torch.randn(B, CV, CAPACITY, generator=generator))
    addresses = (memory.keys.data_ptr(), memory.values.data_ptr(), memory.lengths.data_ptr())
    lengths_tensor = memory.lengths
    q = _query(objects=B)
    real_item = torch.Tensor.item
    items = []
    monkeypatch.setattr(torch.Tensor, "item", lambda t: (items.append(t), real_item(t))[1])
    for lengths in ([5, 40], [40, 1], [17, 17], [40, 40]):
        memory.set_lengths(lengths)
        out = memory.read(q, backend=backend)
        _close(out, _reference(q, memory.keys, memory.values, lengths)[0])
    assert items == []
    assert memory.lengths is lengths_tensor
    assert (memory.keys.data_ptr(), memory.values.data_ptr(),
            memory.lengths.data_ptr()) == addresses
    if backend == "triton":
        assert plannings == {"forward": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_the_prefixs_and_zero_on_the_tail(backend):
    """Storage leaves requiring gradients, NaN past the lengths: dq, dk, dv against float64
    autograd of the prefix; the tail's gradients exactly zero (never NaN)."""
    generator = torch.Generator().manual_seed(5)
    lengths = (9, 26)
    keys = torch.randn(B, CK, CAPACITY, generator=generator)
    values = torch.randn(B, CV, CAPACITY, generator=generator)
    for b, length in enumerate(lengths):
        keys[b, :, length:] = NAN
        values[b, :, length:] = NAN
    keys.requires_grad_()
    values.requires_grad_()
    q = _query(objects=B).requires_grad_()
    memory = FixedCapacityMemory(keys, values, list(lengths))
    cotangent = torch.randn(B, CV, HW, generator=generator)
    out = memory.read(q, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, keys, values), cotangent)

    q64 = q.detach().double().requires_grad_()
    k64 = keys.detach().double().requires_grad_()
    v64 = values.detach().double().requires_grad_()
    expected = _reference(q64, k64, v64, lengths)[0]
    edq, edk, edv = torch.autograd.grad(expected, (q64, k64, v64), cotangent.double())
    _close(out, expected.detach())
    _close(dq, edq, atol=1e-4)
    for b, length in enumerate(lengths):
        _close(dk[b, :, :length], edk[b, :, :length], atol=1e-4)
        _close(dv[b, :, :length], edv[b, :, :length], atol=1e-4)
        assert torch.equal(dk[b, :, length:], torch.zeros_like(dk[b, :, length:]))
        assert torch.equal(dv[b, :, length:], torch.zeros_like(dv[b, :, length:]))


@pytest.mark.skipif(not devices.INTERPRETING and not torch.cuda.is_available(),
                    reason="needs Triton")
def test_gradients_at_changed_lengths_plan_once(plannings, monkeypatch):
    """The triton forward and backward at three lengths of one memory: planned once (the
    kept launches' key holds only whether lengths are given), each gradient the prefix's."""
    from stm_kernels.backends.triton import kept_launches, running
    monkeypatch.setattr(running, "_chosen", {})
    monkeypatch.setattr(kept_launches, "_prepared", {})
    generator = torch.Generator().manual_seed(6)
    keys = torch.randn(B, CK, CAPACITY, generator=generator).requires_grad_()
    values = torch.randn(B, CV, CAPACITY, generator=generator).requires_grad_()
    q = _query(objects=B).requires_grad_()
    memory = FixedCapacityMemory(keys, values)
    planned = None
    for lengths in ([7, 33], [40, 2], [20, 20]):
        memory.set_lengths(lengths)
        cotangent = torch.randn(B, CV, HW, generator=generator)
        dq, dk, dv = torch.autograd.grad(memory.read(q, backend="triton"), (q, keys, values),
                                         cotangent)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, keys, values))
        expected = _reference(q64, k64, v64, lengths)[0]
        edq, edk, edv = torch.autograd.grad(expected, (q64, k64, v64), cotangent.double())
        _close(dq, edq, atol=1e-4)
        _close(dk, edk, atol=1e-4)
        _close(dv, edv, atol=1e-4)
        planned = planned or dict(plannings)
    assert plannings == planned and planned.get("forward") == 1 and planned.get("dv") == 1


def _capturing(monkeypatch):
    """Make the read see a CUDA graph capture in progress (what it asks torch.cuda)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("backend", ["naive", *BACKENDS])
def test_under_capture_a_plain_tensors_lengths_are_refused_in_one_line(backend, monkeypatch):
    memory = _memory()
    q = _query()
    plain = memory.lengths.clone()
    _capturing(monkeypatch)
    for lengths in (plain, [13, 30]):
        with pytest.raises(ValueError, match="^memory_lengths under CUDA graph capture must "
                                             "be a FixedCapacityMemory's lengths") as error:
            memory_read(q, memory.keys, memory.values, memory_lengths=lengths, backend=backend)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="CUDA graph capture"):
        memory_usage(q, memory.keys, torch.zeros(B, HW), memory_lengths=plain, backend=backend)


@pytest.mark.parametrize("backend", ["naive", *BACKENDS])
def test_under_capture_the_objects_lengths_are_read_without_a_device_read(backend,
                                                                          monkeypatch):
    """The capture check patched on: the memory's own lengths are checked from the host's
    record (no Tensor.item); the torch backend, which reads lengths on the host, is refused
    in one line."""
    memory = _memory()
    q = _query()
    expected = _reference(q, memory.keys, memory.values, (13, 30))[0]
    _capturing(monkeypatch)
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a device read"))
    if backend == "torch":
        with pytest.raises(ValueError, match="^memory_lengths under CUDA graph capture needs "
                                             "backend='triton' or 'naive'"):
            memory.read(q, backend=backend)
        return
    _close(memory.read(q, backend=backend), expected)


def test_lengths_changed_behind_the_objects_back_are_checked_again(monkeypatch):
    memory = _memory()
    q = _query()
    with torch.no_grad():
        memory.lengths.fill_(CAPACITY + 1)  # not through set_lengths: the record is stale
    with pytest.raises(ValueError, match=r"memory_lengths must be .* values in \[1, N=40\]; "
                                         r"got values in \[41, 41\]"):
        memory.read(q, backend="torch")
    memory.lengths.fill_(13)
    _close(memory.read(q, backend="torch"),
           _reference(q, memory.keys, memory.values, (13, 13))[0])  # checked, then read
    _capturing(monkeypatch)
    with pytest.raises(ValueError, match="under CUDA graph capture must be a "
                                         "FixedCapacityMemory's lengths"):
        memory.read(q, backend="naive")
    memory.set_lengths([13, 30])  # recorded again
    _close(memory.read(q, backend="naive"),
           _reference(q, memory.keys, memory.values, (13, 30))[0])


def test_the_recorded_range_is_checked_against_the_memory_read(monkeypatch):
    """Without a device read: a zero length, or lengths longer than the memory passed to the
    read (a slice of the storage), are refused from the host's record."""
    memory = _memory()
    q = _query()
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a device read"))
    with pytest.raises(ValueError, match=r"values in \[1, N=20\]; got values in \[13, 30\]"):
        memory_read(q, memory.keys[:, :, :20], memory.values[:, :, :20],
                    memory_lengths=memory.lengths, backend="torch")
    memory.set_lengths([0, 30])
    with pytest.raises(ValueError, match=r"got values in \[0, 30\]"):
        memory.read(q, backend="torch")


def test_lengths_are_checked_where_they_are_set():
    memory = FixedCapacityMemory.empty(B, CK, CV, CAPACITY)
    for bad in (CAPACITY + 1, -1, [1, 2, 3], [1, CAPACITY + 1], [1.0, 2], True):
        with pytest.raises(ValueError, match=r"^lengths must be 2 integers in \[0, capacity=40\]"):
            memory.set_lengths(bad)
    with pytest.raises(TypeError, match="not a tensor"):
        memory.set_lengths(torch.tensor([1, 2]))
    memory.set_lengths([38, 36])
    with pytest.raises(ValueError, match="append of 3 positions passes the capacity 40"):
        memory.append(torch.zeros(B, CK, 3), torch.zeros(B, CV, 3))
    assert memory.host_lengths == (38, 36) and memory.lengths.tolist() == [38, 36]
    with pytest.raises(ValueError, match=r"append expects keys \(B=2, Ck=8, \*P\)"):
        memory.append(torch.zeros(B, CK + 1, 1), torch.zeros(B, CV, 1))
    with pytest.raises(ValueError, match="capacity must be a positive integer"):
        FixedCapacityMemory.empty(B, CK, CV, 0)
    with pytest.raises(ValueError, match="must share objects B and memory layout"):
        FixedCapacityMemory(torch.zeros(B, CK, 4), torch.zeros(B, CV, 5))


def test_storage_given_as_frames_is_read_through_views():
    """Storage (B, C, T, h, w) (a memory bank's frames) flattened to (B, C, T·h·w) views:
    append writes into the caller's tensors."""
    keys, values = torch.full((B, CK, 4, 2, 3), NAN), torch.full((B, CV, 4, 2, 3), NAN)
    memory = FixedCapacityMemory(keys, values)
    assert memory.capacity == 24 and memory.keys.data_ptr() == keys.data_ptr()
    frame_keys, frame_values = torch.randn(B, CK, 2, 3), torch.randn(B, CV, 2, 3)
    memory.append(frame_keys, frame_values)
    assert torch.equal(keys[:, :, 0], frame_keys) and torch.equal(values[:, :, 0], frame_values)
    q = _query()
    _close(memory.read(q, backend="torch"),
           _reference(q, frame_keys.flatten(2), frame_values.flatten(2), (6, 6))[0])


def test_lengths_made_under_inference_mode_are_still_recorded():
    """A memory built and updated under torch.inference_mode (as the segmenters run): its
    lengths track versions, so the host's record holds."""
    from stm_kernels.inputs import known_range
    with torch.inference_mode():
        memory = FixedCapacityMemory.empty(B, CK, CV, CAPACITY)
        memory.set_lengths([3, 4])
        assert known_range(memory.lengths) == (3, 4)
        memory.append(torch.zeros(B, CK, 2), torch.zeros(B, CV, 2))
        assert known_range(memory.lengths) == (5, 6)


@pytest.mark.parametrize("first", ["FixedCapacityMemory", "memory_usage"])
def test_the_op_stays_the_packages_memory_read_whatever_is_imported_first(first):
    """Importing stm_kernels.fixed_memory (or memory_usage) loads the submodule
    stm_kernels.memory_read, which the import system binds to the package's name memory_read:
    the package puts the op back."""
    import subprocess
    import sys
    code = (f"from stm_kernels import {first}\n"
            "from stm_kernels import memory_read\n"
            "import sys\n"
            "assert memory_read is sys.modules['stm_kernels.memory_read'].memory_read, "
            "memory_read\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_known_range_goes_with_its_lengths_tensor():
    """FixedCapacityMemory's lengths are recorded by identity with their version: the range
    is known while the tensor stands as recorded, forgotten at an unrecorded change, and its
    entry leaves the table with the tensor (no table growing with every memory made)."""
    import gc

    from stm_kernels import inputs
    before = len(inputs._KNOWN_RANGES)
    memory = FixedCapacityMemory.empty(2, 4, 3, 10)
    key = id(memory.lengths)
    memory.append(torch.randn(2, 4, 5), torch.randn(2, 3, 5))
    assert inputs.known_range(memory.lengths) == (5, 5)
    memory.lengths[1] = 2  # not through the memory: the host no longer knows it
    assert inputs.known_range(memory.lengths) is None
    del memory
    gc.collect()
    assert key not in inputs._KNOWN_RANGES and len(inputs._KNOWN_RANGES) == before
