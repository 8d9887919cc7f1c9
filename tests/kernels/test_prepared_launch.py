"""Prepared launches: a read planned once per layout (device, precision, shapes, strides,
dtype, scale, similarity, raggedness), later calls running the kept launches with their own
tensors. What must hold: a repeated call plans nothing and computes its own inputs' result
(never the first call's), a new layout or mode plans anew, forced configs are honoured, a
failing prepared launch plans afresh, and nothing kept holds a tensor. The kernels run in the
interpreter; results are checked against the read in plain float64 torch (reference.py).
"""
import types

import pytest
import torch

from reference import reference_read, reference_select, reference_usage
from helpers import (TOLERANCE, NoHostReads, RecordedOps, check_read, random_inputs,
                     read_with_grads, reference_with_grads, relative_error)
from stm_kernels import memory_read, poison_outputs
from stm_kernels.backends.triton import devices, kept_launches, launch, running
from stm_kernels.backends.triton.launch import ForwardConfig, use_configs

pytestmark = [pytest.mark.skipif(not devices.INTERPRETING, reason="needs TRITON_INTERPRET=1"),
              # the kernels, never the torch backend's fallback, compute every result here
              pytest.mark.filterwarnings("error::stm_kernels.FallbackWarning"),
              pytest.mark.usefixtures("fresh_launches")]


@pytest.fixture
def checked_launches(monkeypatch):
    """[kernel name] of every launch, each checked to pass exactly its kernel's parameters."""
    real, launches = running.run, []

    def checked(kernel, grid, arguments, config, call, **options):
        launches.append(kernel.__name__)
        assert sorted(arguments) == sorted(kernel.arg_names), kernel.__name__
        return real(kernel, grid, arguments, config, call, **options)

    monkeypatch.setattr(running, "run", checked)
    return launches


def _prepared():
    return list(kept_launches._prepared.values())


# B, Bq, Ck, Cv, HW, N: the memory split in several parts (a merge launch), ragged sizes
SHAPE = (2, 1, 16, 24, 30, 300)


@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_a_repeated_read_plans_once_and_computes_its_own_inputs(plannings, similarity,
                                                                 deterministic):
    torch.use_deterministic_algorithms(deterministic)
    try:
        first = random_inputs(*SHAPE, torch.float32, "cpu", seed=0)
        read_with_grads(*first, backend="triton", similarity=similarity)
        planned = dict(plannings)
        assert planned.get("forward") == 1 and planned.get("merge") == 1
        assert planned.get("dv") == 1
        assert planned.get("dq" if deterministic else "dkdq") == 1

        second = random_inputs(*SHAPE, torch.float32, "cpu", seed=5)
        results = read_with_grads(*second, seed=7, backend="triton", similarity=similarity)
    finally:
        torch.use_deterministic_algorithms(False)
    assert plannings == planned  # the second call chose no config
    check_read(results, reference_with_grads(*second, seed=7, similarity=similarity),
               torch.float32)
    forward, backward = sorted(_prepared(), key=lambda p: type(p).__name__ != "PreparedForward")
    assert forward.merge is not None  # the split's merge was kept too
    assert (backward.dq is not None) == deterministic


def test_a_new_layout_or_mode_plans_anew(plannings):
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu")
    memory_read(q, k, v, backend="triton")
    variants = [
        lambda: memory_read(q.transpose(1, 2).contiguous().transpose(1, 2), k, v,
                            backend="triton"),  # the query's strides
        lambda: memory_read(q, k[:, :, :200], v[:, :, :200], backend="triton"),  # N
        lambda: memory_read(q, k, v, backend="triton", similarity="l2"),
        lambda: memory_read(q, k, v, backend="triton", scale=0.5),
        lambda: memory_read(q, k, v, backend="triton", memory_lengths=torch.tensor([300, 90])),
    ]
    for index, variant in enumerate(variants):
        before = plannings["forward"]
        variant()
        assert plannings["forward"] == before + 1, f"variant {index} reused a plan"
    assert len(_prepared()) == 1 + len(variants)


def _strided_copy(tensor):
    """The same values with positions outermost in memory: other strides, same shape."""
    return tensor.transpose(1, 2).contiguous().transpose(1, 2)


# One read per entry, after a read of the base layout: (name, inputs of memory_read given the
# base's q, k, v, its options). Each changes one thing the kept launch's key must hold.
LAYOUT_CHANGES = [
    ("float16", lambda q, k, v: ((q.half(), k.half(), v.half()), {})),
    ("k strides", lambda q, k, v: ((q, _strided_copy(k), v), {})),
    ("v strides", lambda q, k, v: ((q, k, _strided_copy(v)), {})),
    ("query per object", lambda q, k, v: ((q.expand(2, -1, -1).contiguous() *
                                           torch.tensor([1.0, -1.0])[:, None, None], k, v),
                                          {})),
    ("broadcast query", lambda q, k, v: ((q.expand(2, -1, -1), k, v), {})),
    ("l2", lambda q, k, v: ((q, k, v), {"similarity": "l2"})),
    ("scale", lambda q, k, v: ((q, k, v), {"scale": 0.3})),
    ("ragged", lambda q, k, v: ((q, k, v), {"memory_lengths": torch.tensor([300, 90])})),
    ("other lengths", lambda q, k, v: ((q, k, v), {"memory_lengths": torch.tensor([40, 250])})),
]


@pytest.mark.parametrize("change", LAYOUT_CHANGES, ids=[name for name, _ in LAYOUT_CHANGES])
def test_a_read_after_a_kept_launch_of_another_layout_is_its_own_read(change):
    """The kept-launch cache by values: a read of the base layout keeps its launches, then a
    read that differs in one thing (dtype, k or v strides, the query per object or
    broadcast, similarity, scale, ragged lengths) gets its own inputs' result in its own
    dtype, against the float64 read written out in plain torch; then the base layout again
    gets its own. A key that missed the change would hand it the base layout's launch."""
    _, changed = change
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu", seed=9)
    base = memory_read(q, k, v, backend="triton")
    inputs, options = changed(q, k, v)
    out = memory_read(*inputs, backend="triton", **options)
    reference_options = {("lengths" if key == "memory_lengths" else key): value
                         for key, value in options.items()}
    expected = reference_read(*inputs, **reference_options)[0]
    assert out.dtype == inputs[2].dtype and out.shape == expected.shape
    assert relative_error(out, expected) < TOLERANCE[inputs[2].dtype]
    again = memory_read(q, k, v, backend="triton")
    assert torch.equal(again, base)
    assert relative_error(base, reference_read(q, k, v)[0]) < TOLERANCE[torch.float32]


def test_ragged_lengths_are_read_per_call(plannings):
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu")
    memory_read(q, k, v, backend="triton", memory_lengths=torch.tensor([300, 90]))
    lengths = torch.tensor([40, 250])
    out = memory_read(q, k, v, backend="triton", memory_lengths=lengths)
    assert plannings["forward"] == 1
    for b, length in enumerate(lengths.tolist()):
        expected = reference_read(q, k[b:b + 1, :, :length], v[b:b + 1, :, :length])[0]
        assert torch.allclose(out[b:b + 1].double(), expected, atol=TOLERANCE[torch.float32])


def test_forced_configs_are_honoured_after_a_plan_is_kept(monkeypatch):
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu")
    memory_read(q, k, v, backend="triton")
    configs = []
    real = running.run

    def recorded(kernel, grid, arguments, config, call, **options):
        configs.append((kernel.__name__, config))
        return real(kernel, grid, arguments, config, call, **options)

    monkeypatch.setattr(running, "run", recorded)
    forced = ForwardConfig(block_m=16, block_n=16, splits=1, num_warps=4, num_stages=1)
    with use_configs(forward=forced):
        out = memory_read(q, k, v, backend="triton")
        again = memory_read(q, k, v, backend="triton")  # the forced set's own kept launch
    assert configs == [("memory_read_fwd_kernel", forced)] * 2
    expected = reference_read(q, k, v)[0]
    assert torch.allclose(out.double(), expected, atol=TOLERANCE[torch.float32])
    assert torch.equal(out, again)
    configs.clear()
    memory_read(q, k, v, backend="triton")  # the default's kept launch again
    assert [config for _, config in configs] != [forced] and len(configs) == 2  # split, merge
    assert len(kept_launches._prepared) == 2


def test_a_forced_config_set_plans_once_and_keeps_its_own_launches(plannings):
    """use_configs is part of the layout key: a repeated forced read plans once, and another
    forced set, or none, has launches of its own."""
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu")
    small = ForwardConfig(block_m=16, block_n=16, splits=1, num_warps=4, num_stages=1)
    other = ForwardConfig(block_m=16, block_n=32, splits=2, num_warps=4, num_stages=1)
    for config in (small, small, other, other, small):
        with use_configs(forward=config):
            memory_read(q, k, v, backend="triton")
    assert plannings["forward"] == 2
    memory_read(q, k, v, backend="triton")
    assert plannings["forward"] == 3 and len(kept_launches._prepared) == 3


def test_a_failing_prepared_launch_plans_afresh(monkeypatch, plannings):
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu")
    memory_read(q, k, v, backend="triton")
    real, failures = running.run, []

    def fails_once(kernel, grid, arguments, config, call, **options):
        if not failures:
            failures.append(kernel.__name__)
            raise RuntimeError("injected failure of a prepared launch")
        return real(kernel, grid, arguments, config, call, **options)

    monkeypatch.setattr(running, "run", fails_once)
    out = memory_read(q, k, v, backend="triton")
    assert failures == ["memory_read_fwd_kernel"] and plannings["forward"] == 2
    expected = reference_read(q, k, v)[0]
    assert torch.allclose(out.double(), expected, atol=TOLERANCE[torch.float32])


def _tensors_in(value, depth=0):
    """The tensors reachable from a kept launch through its fields, slots, lists and dicts."""
    if torch.is_tensor(value):
        return [value]
    if depth > 4 or isinstance(value, (str, bytes, int, float, type(None))):
        return []
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, (list, tuple)):
        children = list(value)
    else:
        names = list(getattr(value, "__dict__", {})) + list(getattr(type(value), "__slots__", ()))
        children = [getattr(value, name, None) for name in names]
    return [tensor for child in children for tensor in _tensors_in(child, depth + 1)]


def test_nothing_kept_holds_a_tensor(monkeypatch):
    # each launch's compile stood in for (the interpreter makes none), so that the kept
    # launches keep their direct launches too
    real = running.run

    def run(*args, **kwargs):
        real(*args, **kwargs)
        return types.SimpleNamespace(run=None, function=None, packed_metadata=None)

    monkeypatch.setattr(running, "run", run)
    monkeypatch.setattr("stm_kernels.backends.triton.direct_launch._triton_streams",
                        lambda: (None, None))
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu")
    read_with_grads(q, k, v, backend="triton", similarity="l2")
    kept = _prepared()
    assert len(kept) == 2
    launches = [launched for prepared in kept for launched in (
        getattr(prepared, name, None)
        for name in ("forward", "merge", "prepare", "dv", "dkdq", "dq"))
        if launched is not None]
    assert len(launches) == 5 and all(launched.direct is not None for launched in launches)
    assert _tensors_in(kept) == []


@pytest.mark.parametrize("with_lse_gradient", [False, True], ids=["dO", "dO-and-dlse"])
def test_a_kept_backward_runs_only_its_own_torch_work(with_lse_gradient):
    # Beside its kernels (dropped here) a kept bf16 backward only casts dQ: delta (from dO and
    # O, minus d lse), the copies of q and dO with aligned rows (theirs are 30 apart) and the
    # zeroed dQ accumulator are the prepare kernel's, one launch; no copy of O, no pass of its
    # own to scale dQ (the kernels add it scaled). Each torch operation would be a launch on a
    # GPU, at ten memory frames about as long as the kernels (docs/performance.md).
    generator = torch.Generator().manual_seed(0)
    q, k, v, out, grad_out = (torch.randn(shape, generator=generator).bfloat16()
                              for shape in ((1, 16, 30), (2, 16, 64), (2, 24, 64), (2, 24, 30),
                                            (2, 24, 30)))
    lse = torch.randn(2, 30, generator=generator)
    grad_lse = torch.randn(2, 30, generator=generator) if with_lse_gradient else None
    launched = []

    def backward():
        return launch.triton_backward(grad_out, grad_lse, q, k, v, out, lse, 0.25, False)

    # (without the suite's NaN poisoning of every new buffer, a fill of its own)
    with running.recording(lambda kernel, grid, arguments, *_: launched.append(
            (kernel.fn.__name__, arguments))), poison_outputs(False):
        backward()  # plans and keeps the launches
        launched.clear()
        with RecordedOps() as recorded:
            dq, _, _ = backward()
    counts = recorded.counts()
    arithmetic = {name: calls for name, calls in counts.items()
                  if name not in ("empty", "empty_strided", "slice")}  # allocations, views
    assert arithmetic == {"_to_copy": 1} and dq.dtype == torch.bfloat16
    assert [name for name, _ in launched] == [
        "memory_read_bwd_kernel_prepare", "memory_read_bwd_kernel_dv",
        "memory_read_bwd_kernel_dkdq"]
    prepare = launched[0][1]
    assert (prepare["COPY_DO"], prepare["COPY_Q"], prepare["ZERO_DQ"], prepare["GRAD_LSE"]) == \
        (True, True, True, with_lse_gradient)
    # the kernels after it read its buffers
    for name, arguments in launched[1:]:
        assert arguments["do"] is prepare["do_copy"] and arguments["q"] is prepare["q_copy"], name
    assert launched[2][1]["delta"] is prepare["delta"] and launched[2][1]["dq"] is prepare["dq"]


@pytest.mark.parametrize("dtype, streamed, copies", [
    (torch.float16, False, 0), (torch.float16, True, 1), (torch.float32, False, 1)],
    ids=["fp16-held", "fp16-streamed", "fp32-held"])
def test_a_forward_copies_its_query_only_where_its_tiling_needs_it(dtype, streamed, copies):
    # A forward program loads its 16-bit query tile once, as it is (rows 30 apart here, off
    # the 16-element alignment); a tiling that streams the tile (re-read per memory step), and
    # any 32-bit one, gets the query with aligned rows: a copy. Each computes the read.
    q, k, v = random_inputs(2, 1, 16, 24, 30, 100, dtype, "cpu", seed=3)
    config = ForwardConfig(32, 32, None, 4, 1, stream_queries=streamed)
    with use_configs(forward=config):
        out = memory_read(q, k, v, backend="triton", scale=0.25)
        # the launcher itself (memory_read under a dispatch mode takes the custom op), its
        # kernels dropped (the interpreter's own torch work would be counted)
        with running.recording(lambda *arguments: None), poison_outputs(False):
            launch.triton_forward(q, k, v, 0.25, False)  # plans and keeps the launches
            with RecordedOps() as recorded:
                launch.triton_forward(q, k, v, 0.25, False)
    counts = recorded.counts()
    assert counts["copy_"] == copies, dict(counts)
    assert counts["empty"] >= 2  # the outputs: the operations were seen
    expected = reference_read(q, k, v, scale=0.25)[0]
    assert relative_error(out, expected) < TOLERANCE[dtype]


def test_deterministic_mode_plans_its_own_backward(plannings):
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu")
    read_with_grads(q, k, v, backend="triton")
    torch.use_deterministic_algorithms(True)
    try:
        first = read_with_grads(q, k, v, backend="triton")
        second = read_with_grads(q, k, v, backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    assert plannings.get("dq") == 1  # planned when the mode changed, kept after
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # bitwise: the kept launches are the deterministic ones


def test_the_oldest_layouts_are_dropped_beyond_the_limit(monkeypatch, plannings):
    monkeypatch.setattr(kept_launches, "PREPARED_LAYOUTS", 2)
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu")
    for n in (100, 200, 300):  # a memory growing by one size per memory frame
        memory_read(q, k[:, :, :n], v[:, :, :n], backend="triton")
    kept = [key for key in kept_launches._prepared]
    assert len(kept) == 2 and [key[-2][0][-1] for key in kept] == [200, 300]
    memory_read(q, k[:, :, :300], v[:, :, :300], backend="triton")
    assert plannings["forward"] == 3  # the newest is still kept
    memory_read(q, k[:, :, :100], v[:, :, :100], backend="triton")
    assert plannings["forward"] == 4  # the oldest was dropped: planned again


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
def test_every_launch_passes_exactly_its_kernels_parameters(checked_launches, deterministic):
    """The interpreter ignores a keyword argument its kernel lacks; a GPU's launcher refuses
    it (and the read would fall back to torch): first and prepared calls alike."""
    torch.use_deterministic_algorithms(deterministic)
    try:
        for seed in (0, 1):
            read_with_grads(*random_inputs(*SHAPE, torch.float32, "cpu", seed=seed),
                            backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    per_call = ["memory_read_fwd_kernel", "memory_read_merge_kernel",
                "memory_read_bwd_kernel_prepare", "memory_read_bwd_kernel_dv",
                "memory_read_bwd_kernel_dkdq"]
    per_call += ["memory_read_bwd_kernel_dq"] * deterministic
    assert checked_launches == per_call * 2


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_selection_and_usage_plan_once_and_compute_their_own_inputs(plannings, similarity):
    l2, scale = similarity == "l2", 0.25
    options = dict(scale=scale, similarity=similarity)
    for seed in (0, 3):
        q, k, _ = random_inputs(*SHAPE, torch.float32, "cpu", seed=seed)
        lse = torch.randn(SHAPE[0], SHAPE[4], generator=torch.Generator().manual_seed(seed))
        lengths = torch.tensor([300, 90 + seed])
        scores, indices = launch.triton_select(q, k, 7, scale, l2, lengths)
        usage = launch.triton_usage(q, k, lse, scale, l2, lengths)
        expected_scores, expected_indices = reference_select(q, k, 7, lengths=lengths,
                                                             **options)
        assert torch.equal(indices, expected_indices)
        assert torch.allclose(scores.double(), expected_scores, atol=1e-4)
        expected_usage = reference_usage(q, k, lse, lengths=lengths, **options)
        assert torch.allclose(usage.double(), expected_usage, rtol=1e-4, atol=1e-6)
    assert plannings == {"select": 1, "select_merge": 1, "usage": 1}
    # another top_k is another plan (its kernel keeps 16 positions per query, not 8)
    scores, indices = launch.triton_select(q, k, 12, scale, l2, lengths)
    assert torch.equal(indices, reference_select(q, k, 12, lengths=lengths, **options)[1])
    assert plannings["select"] == plannings["select_merge"] == 2


def test_selection_and_usage_launches_pass_exactly_their_kernels_parameters(checked_launches):
    q, k, _ = random_inputs(*SHAPE, torch.float32, "cpu")
    for _ in range(2):
        launch.triton_select(q, k, 7, 0.25, False)
        launch.triton_usage(q, k, torch.zeros(SHAPE[0], SHAPE[4]), 0.25, False)
    assert checked_launches == ["memory_read_topk_kernel", "memory_read_topk_merge_kernel",
                                "memory_read_usage_kernel"] * 2


def test_threads_keeping_layouts_at_the_limit_never_fail(monkeypatch):
    """Layouts kept from many threads at once (a server's workers meeting new shapes): the
    oldest are dropped once each, never twice (which raised KeyError), and the limit holds."""
    import sys
    import threading
    monkeypatch.setattr(kept_launches, "PREPARED_LAYOUTS", 4)
    errors, interval = [], sys.getswitchinterval()

    def keep(thread):
        try:
            for index in range(2000):
                kept_launches._keep_prepared((thread, index), object())
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            errors.append(error)

    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    try:
        threads = [threading.Thread(target=keep, args=(thread,)) for thread in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and len(kept_launches._prepared) <= 4


def test_planning_every_call_keeps_and_reuses_nothing_until_it_ends(plannings):
    """host_path's A/B switch: inside it every read plans and computes its own inputs' result,
    and nothing is kept; after it, the launches kept before it run again."""
    first = random_inputs(*SHAPE, torch.float32, "cpu", seed=0)
    read_with_grads(*first, backend="triton")
    kept = dict(kept_launches._prepared)
    assert len(kept) == 2 and plannings["forward"] == plannings["dv"] == 1
    with kept_launches.planning_every_call():
        for seed in (3, 4):
            inputs = random_inputs(*SHAPE, torch.float32, "cpu", seed=seed)
            check_read(read_with_grads(*inputs, seed=seed, backend="triton"),
                       reference_with_grads(*inputs, seed=seed), torch.float32)
        assert kept_launches._prepared == kept
    assert plannings["forward"] == plannings["dv"] == 3
    read_with_grads(*first, backend="triton")
    assert plannings["forward"] == plannings["dv"] == 3  # the kept launches ran


def test_a_kept_selection_runs_its_two_kernels_and_no_torch_arithmetic():
    """A kept top-k selection allocates its buffers and launches the top-k kernel and the
    merge of its memory splits, which decodes the keys too: no torch operation between them
    (the splits' merge and decoding were thirteen torch kernels, each a launch on a GPU). The
    query's rows are aligned here: the launcher copies an unaligned query into 16-aligned rows
    first."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(shape, generator=generator).bfloat16()
            for shape in ((1, 16, 32), (2, 16, 300)))
    launched = []
    with running.recording(lambda kernel, grid, arguments, *_: launched.append(
            kernel.fn.__name__)), poison_outputs(False):
        launch.triton_select(q, k, 7, 0.25, False)  # plans and keeps the launches
        launched.clear()
        with RecordedOps() as recorded:
            scores, indices = launch.triton_select(q, k, 7, 0.25, False)
    arithmetic = {name: calls for name, calls in recorded.counts().items()
                  if name not in ("empty", "slice")}
    assert arithmetic == {} and scores.shape == indices.shape == (2, 32, 7)
    assert launched == ["memory_read_topk_kernel", "memory_read_topk_merge_kernel"]


def test_a_kept_memory_read_reads_no_device_value_on_the_host():
    """memory_read's kept call (the op, its checks, the custom op and the kept launches),
    forward and backward, and a ragged one over a FixedCapacityMemory (whose lengths are
    checked where they are set): no item, nonzero or the like. A plain lengths tensor's
    values are checked on the host by design (docs/op.md): that read is what the mode sees."""
    from stm_kernels import FixedCapacityMemory
    q, k, v = random_inputs(*SHAPE, torch.float32, "cpu", seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    memory = FixedCapacityMemory(k, v, lengths=[300, 90])
    memory_read(*leaves, backend="triton").sum().backward()  # planned and kept
    memory.read(q, backend="triton")
    with NoHostReads():
        memory_read(*leaves, backend="triton").sum().backward()
        out = memory.read(q, backend="triton")
    expected = torch.cat([reference_read(q, k[b:b + 1, :, :n], v[b:b + 1, :, :n])[0]
                          for b, n in enumerate((300, 90))])
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        memory_read(q, k, v, backend="triton", memory_lengths=torch.tensor([300, 90]))
