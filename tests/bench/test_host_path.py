"""bench.host_path (`python -m bench host-path`): the read's host time, layer by layer (its CPU
rows here)."""
import inspect
import json
import time
import types

import pytest
import torch

from stm_kernels.backends.triton import (backward_launcher, devices, gluon_opt_in, kept_launches,
                                         launch, running)
from stm_kernels.experimental import gluon_forward
from bench import host_path


@pytest.mark.filterwarnings("error:STM_KERNELS_WARP_SPECIALIZED")  # no Gluon row falls back
def test_cpu_run_times_the_launchers_python_and_writes_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(running, "_warned", set())  # a fallback warns here, whatever ran before
    monkeypatch.setattr(host_path, "READ_N", 3240)  # the read kinds' rows at a smaller N
    host_path.main(["--ns", "1620", "3240", "--calls", "3"])
    files = list(tmp_path.glob("host_path_cpu_*.json"))
    assert len(files) == 1
    payload = json.loads(files[0].read_text())
    assert payload["complete"] is True and payload["device_type"] == "cpu"
    small = [f"{layer} {host_path.SMALL}" for layer in (
        "backward launcher, no launch", "top-7 selection launcher, no launch",
        "usage launcher, no launch", "op, no launch", "forward + backward, no launch",
        *["Gluon backward launcher, no launch"] * gluon_forward.AVAILABLE,
        *[f"{path}, memory_read_bwd_kernel_{name}, no launch"
          for path in ("Triton's binding", "direct launch") for name in ("prepare", "dv", "dkdq")])]
    binding = [f"{path}, memory_read_{name}_kernel, no launch"
               for path in ("Triton's binding", "direct launch") for name in ("fwd", "merge")]
    # the Gluon rows where its TMA reads the memory: N % 8 == 0 (3,240, not 1,620)
    gluon = ["Gluon launcher, no launch", "Gluon launcher, no launch, planned every call"]
    gluon = {1620: [], 3240: gluon * gluon_forward.AVAILABLE}
    # the four read kinds: each layer timed on meta tensors, in this order (the ragged op's
    # lengths a FixedCapacityMemory's, checked on the host; the top-k read's softmax with no
    # autocast region), none left out
    read_layers = [f"{kind}: {layer}" for kind in host_path.READS for layer in (
        "op", *["autograd alone (a Function that only allocates)"] * (
            kind == "forward + backward"),
        *["custom op's dispatch (its fake implementation)"] * (kind != "top-k"),
        "prepared read", "launcher", "launcher, no launch")]
    reads = [row for row in payload["records"] if ": " in row["layer"]]
    assert payload["not_timed"] == []
    assert [row["layer"] for row in reads] == read_layers
    assert all(row["N"] == 3240 and row["calls"] == 3 for row in reads)
    assert [(row["layer"], row["N"]) for row in payload["records"] if row not in reads] == [
        (layer, n) for n in (1620, 3240) for layer in (
            "launcher, no launch", "launcher, no launch, planned every call", *gluon[n],
            *binding)] + [
        (layer, host_path.SMALL_N) for layer in small * devices.INTERPRETING]
    assert all(0 < row["us"] < 1e6 for row in payload["records"])
    assert [(profile["layer"], profile["N"]) for profile in payload["profiles"]] == [
        ("launcher, no launch", 1620), ("launcher, no launch", 3240),
        ("forward: op", 3240), ("forward + backward: op", 3240)]
    us = {row["layer"]: row["us"] for row in reads}
    # the goals are read at READ_N (here 3,240), against the rows measured
    assert [(goal["layer"], goal["limit"], goal["us"], goal["met"]) for goal in payload["goals"]
            ] == [(layer, limit, us[layer], us[layer] <= limit)
                  for layer, limit in host_path.GOALS.items()]
    functions = [entry["function"] for entry in payload["profiles"][0]["functions"]]
    assert "triton/forward_launcher.py" in " ".join(functions)
    table = host_path.summary(payload)
    assert "| launcher, no launch |" in table and "N = 3,240" in table
    assert "cProfile, launcher, no launch, N = 1,620" in table
    assert "- goal forward: op <= 30 us: " in table
    assert table in capsys.readouterr().out


def _meta_read():
    """q, k, v of one 480p query frame over ten memory frames, on the "meta" device."""
    return (torch.empty(shape, dtype=torch.bfloat16, device="meta")
            for shape in ((1, 128, 1620), (1, 128, 16200), (1, 512, 16200)))


def _forward_launches():
    """The forward's launches for an H100 at that size, recorded (host_path.recorded_launches)."""
    q, k, v = _meta_read()
    with devices.pretend(host_path.H100):
        return host_path.recorded_launches(lambda: launch.triton_forward(q, k, v, 0.1, False))


def test_recorded_launches_are_the_forwards_kernels_with_their_arguments():
    launches = _forward_launches()
    names = [kernel.__name__ for kernel, *_ in launches]
    # ten memory frames on 132 multiprocessors: the memory is split, then merged
    assert names == ["memory_read_fwd_kernel", "memory_read_merge_kernel"]
    grid, arguments, options = launches[0][1:]
    assert arguments["q"] is not None and arguments["N"] == 16200 and arguments["HW"] == 1620
    assert grid[2] > 1 and options["num_warps"] in (4, 8)


def test_tritons_binding_binds_every_argument_of_the_recorded_launch():
    launches = _forward_launches()
    forward, merge = host_path.triton_binding_calls(launches).values()
    key = forward()
    assert key is not None and forward() is key  # the second call hits the key cache
    kernel, grid, arguments, options = launches[0]
    other = {**arguments, "BLOCK_M": arguments["BLOCK_M"] // 2}  # another compile's key
    [elsewhere] = host_path.triton_binding_calls([(kernel, grid, other, options)]).values()
    assert elsewhere() != key
    kernel, grid, arguments, options = launches[1]
    del arguments["HW"]  # a launch missing an argument fails in Triton's binder
    [incomplete] = host_path.triton_binding_calls([(kernel, grid, arguments, options)]).values()
    with pytest.raises(TypeError):
        incomplete()


def test_the_gluon_rows_plan_its_launch_once_and_launch_nothing(gluon_plannings):
    if not gluon_forward.AVAILABLE:
        pytest.skip(f"Gluon unavailable: {gluon_forward.UNAVAILABLE_REASON}")
    q, k, v = _meta_read()
    kept_launches.forget_choices()
    kernel = gluon_forward.memory_read_ws_fwd_kernel
    with devices.pretend(host_path.H100), running.recording(host_path._nothing), \
            host_path.gluon_without_launch():
        for _ in range(3):
            launch.triton_forward(q, k, v, 0.1, False)
        with kept_launches.planning_every_call():
            launch.triton_forward(q, k, v, 0.1, False)
        assert gluon_forward.memory_read_ws_fwd_kernel is not kernel
    assert gluon_forward.memory_read_ws_fwd_kernel is kernel  # restored
    assert not gluon_opt_in.warp_specialized_opted_in()
    assert len(gluon_plannings) == 2  # the first call, then the one planned every call
    kept_launches.forget_choices()


def test_the_gluon_backward_row_plans_both_kernels_once_and_launches_nothing(monkeypatch,
                                                                            fresh_launches):
    """gluon_without_launch(backward=True): the backward launcher, on small CPU tensors planned
    for an H100, plans the Gluon dV and dK/dQ kernels once each and keeps them (later calls
    make their descriptors and launch nothing); the kernels and checks are restored after."""
    if not devices.INTERPRETING:
        pytest.skip("the small CPU rows need TRITON_INTERPRET=1")
    from stm_kernels.experimental import gluon_backward, gluon_backward_dv
    if not gluon_backward.AVAILABLE:
        pytest.skip(f"Gluon unavailable: {gluon_backward.UNAVAILABLE_REASON}")
    plannings = []
    for module in (gluon_backward, gluon_backward_dv):
        real = module.prepare
        monkeypatch.setattr(module, "prepare", lambda *a, real=real, module=module, **kw:
                            plannings.append(module.__name__) or real(*a, **kw))
    kernels = (gluon_backward.memory_read_ws_bwd_dkdq_kernel,
               gluon_backward_dv.memory_read_ws_bwd_dv_kernel)
    backward = host_path._small_cpu_layers()[f"backward launcher, no launch {host_path.SMALL}"]
    with devices.pretend(host_path.H100), running.recording(host_path._nothing), \
            host_path.gluon_without_launch(backward=True):
        for _ in range(3):
            backward()
    assert sorted(plannings) == sorted(m.__name__ for m in (gluon_backward, gluon_backward_dv))
    [kept] = [p for key, p in kept_launches._prepared.items() if key[0][0] == "backward"]
    assert isinstance(kept.dv, backward_launcher.GluonDvLaunch)
    assert isinstance(kept.dkdq, backward_launcher.GluonDkdqLaunch)
    assert (gluon_backward.memory_read_ws_bwd_dkdq_kernel,
            gluon_backward_dv.memory_read_ws_bwd_dv_kernel) == kernels  # restored
    assert not gluon_opt_in.warp_specialized_backward_opted_in()


def test_per_call_time_counts_every_call():
    calls = []
    us = host_path.per_call_us(lambda: calls.append(1), 7, torch.device("cpu"), repeats=2)
    assert us > 0
    assert len(calls) == 3 + 2 * 7  # warm-up (at least 3), then two rounds of 7


def _busy(n):
    return sum(i * i for i in range(n))


def test_python_profile_ranks_functions_by_own_time_per_call():
    """Per call of the profiled call: the generator's 20,001 steps, sum's and _busy's one,
    ranked by own time."""
    def call():
        _busy(20000)
    profile = host_path.python_profile(call, 4, torch.device("cpu"), top=5)
    assert len(profile) == 5
    assert profile == sorted(profile, key=lambda entry: -entry["own_us"])
    by_name = {entry["function"]: entry for entry in profile}
    line = _busy.__code__.co_firstlineno
    # which of the generator and sum spends more own time depends on the machine: not asserted
    steps = by_name[f"bench/test_host_path.py:{line + 1}(<genexpr>)"]
    assert steps["calls"] == 20001
    assert by_name["<built-in method builtins.sum>"]["calls"] == 1
    busy = by_name[f"bench/test_host_path.py:{line}(_busy)"]
    assert busy["calls"] == 1 and busy["total_us"] >= steps["own_us"] > 0


def test_the_direct_launch_rows_launch_the_recorded_arguments_as_tritons_binder_binds_them():
    launches = _forward_launches()
    launched = []

    def compiled_of(kernel, grid, arguments, options):
        return types.SimpleNamespace(run=lambda *call: launched.append(call), function=None,
                                     packed_metadata=None)

    directs = host_path._direct_launches(launches, compiled_of)
    for (kernel, grid, arguments, _), (direct, tensors) in zip(launches, directs, strict=True):
        assert direct(tensors)
        assert launched[-1][:3] == tuple(grid) + (1,) * (3 - len(grid))
        names = list(inspect.signature(kernel.fn).parameters)
        sent = dict(zip(names, launched[-1][9:], strict=True))
        assert sent.keys() == arguments.keys()
        for name, value in arguments.items():  # tensors: the CPU twins of the meta ones
            if isinstance(value, torch.Tensor):
                assert (sent[name].shape, sent[name].stride()) == (value.shape, value.stride())
            else:
                assert sent[name] == value
    forward, merge = host_path.direct_launch_calls(launches).values()
    assert forward() is True and merge() is True


def test_a_slow_read_row_is_timed_with_fewer_calls(monkeypatch):
    """A read row whose calls take long (the top-k softmax's torch operations on meta tensors
    run Python reference code) is timed in rounds of about ROUND_S, at least 3 calls."""
    monkeypatch.setattr(host_path, "ROUND_S", 0.05)
    assert 3 <= host_path._calls_within(lambda: time.sleep(0.01), 300) <= 5
    assert host_path._calls_within(lambda: time.sleep(0.1), 300) == 3
    assert host_path._calls_within(lambda: None, 300) == 300
