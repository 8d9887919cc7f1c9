"""`python -m bench kernel`'s peers (issue 57, item 1): SDPA split into 128-wide value chunks
with the flash and the cuDNN backends forced, FlexAttention compiled, the chunked torch read and
the naive read, timed in the same run as the fused read; the best peer at each point and the
ratio to it in the table and the plots; the peers that cannot run recorded with their reason.
Tiny sizes on CPU, where the CUDA-only peers refuse."""
import json
import math

import pytest
import torch

from bench import __main__ as suite
from bench import kernel, report
from reference import reference_read


def _record(provider, ms, pass_="fwd", N=16200, status="ok", **extra):
    return dict(sweep="targets", provider=provider, **{"pass": pass_}, dtype="bf16", B=1,
                HW=1620, N=N, Ck=128, Cv=512, status=status,
                **(dict(median_ms=ms, q20_ms=ms, q80_ms=ms, tflops=1.0, peak_mem_bytes=2**20)
                   if status == "ok" else {}), **extra)


def _payload(records):
    return {"device_type": "cuda", "device": "Test GPU", "matmul_tflops": {"bf16": 700.0},
            "matmul_size": 8192, "records": records}


def test_the_best_peer_is_the_fastest_peer_that_ran_at_each_point():
    records = [_record("triton", 0.5, errors={"out": 2e-3}), _record("torch", 4.0),
               _record("naive", 60.0),
               _record("sdpa", 3.0), _record("sdpa_flash_split", 1.5),
               _record("sdpa_cudnn_split", None, status="refused: No available kernel. "
                       "Aborting execution. (cuDNN attention does not support head dim 512)"),
               _record("flex", None, status="error: InductorError: out of shared memory"),
               # at another N the flash split refused: the best there is sdpa
               _record("triton", 1.0, N=64800), _record("sdpa", 5.0, N=64800),
               _record("sdpa_flash_split", None, N=64800, status="refused: no kernel"),
               _record("naive", None, N=64800, status="oom")]
    payload = _payload(records)
    assert kernel.peers_of(payload) == ["torch", "naive", "sdpa", "sdpa_flash_split",
                                        "sdpa_cudnn_split", "flex"]
    assert kernel.best_peer(payload, records[0]) == ("sdpa_flash_split", 3.0)
    assert kernel.best_peer(payload, records[7]) == ("sdpa", 5.0)
    assert kernel.best_peer(payload, records[1]) == ("sdpa_flash_split", 1.5 / 4.0)
    table = kernel.summary(payload)
    header = table.splitlines()[0]
    assert "| best peer | vs best peer | vs torch | vs naive | vs sdpa | vs sdpa_flash_split | " \
           "vs sdpa_cudnn_split | vs flex |" in header
    assert ("| targets | fwd | bf16 | 1 | 1620 | 128 | 512 | 16200 | 0.500 | 1.00 | 0% | 1.0 | "
            "2.0e-03 | sdpa_flash_split | **3.00x** | 8.00x | 120.00x | 6.00x | 3.00x | refused | "
            "error | 1.0x |") in table
    assert ("| targets | fwd | bf16 | 1 | 1620 | 128 | 512 | 64800 | 1.000 | 1.00 | 0% | 1.0 | "
            "- | sdpa | **5.00x** | n/a | oom | 5.00x | refused | n/a | n/a | n/a |") in table
    # the reasons, once per peer and reason, and the same run's matmul
    assert "| sdpa_cudnn_split | fwd | 1 | refused: No available kernel. Aborting execution. " \
           "(cuDNN attention does not support head dim 512) |" in table
    assert "| flex | fwd | 1 | error: InductorError: out of shared memory |" in table
    assert "Same-run 8192³ matmul: bf16 700.0 TFLOP/s." in table


def test_no_peer_ran():
    payload = _payload([_record("triton", 0.5),
                        _record("flex", None, status="error: ImportError: no flex")])
    assert kernel.best_peer(payload, payload["records"][0]) == (None, None)
    assert "| none ran | n/a | error |" in kernel.summary(payload)


def test_refusal_keeps_the_first_line_and_the_warning_that_says_why():
    class Caught:
        def __init__(self, message):
            self.message = UserWarning(message)
    error = RuntimeError("No available kernel. Aborting execution.\nmore detail")
    caught = [Caught("some other warning"), Caught("Flash attention kernel not used because:"),
              Caught("Flash attention requires q,k,v to have the same last dimension\nand more")]
    assert kernel.refusal("sdpa_flash_split", error, caught) == (
        "refused: No available kernel. Aborting execution. (Flash attention requires q,k,v to "
        "have the same last dimension)")
    assert kernel.refusal("sdpa_cudnn_split", error) == \
        "refused: No available kernel. Aborting execution."
    compile_error = RuntimeError("backend='inductor' raised:\nOutOfResources: shared memory\n..")
    assert kernel.refusal("flex", compile_error) == (
        "error: RuntimeError: backend='inductor' raised: OutOfResources: shared memory")


def test_the_split_peers_read_what_the_op_reads():
    """SDPA calls on value chunks as wide as the key (Ck = 128: four), on the same q and k,
    concatenated, are the read of the whole value (flash forced: it runs on CPU too), forward
    and gradients."""
    B, HW, N, Ck, Cv = 2, 24, 40, 16, 512
    call, tensors = kernel.make_inputs("sdpa_flash_split", "fwd", torch.float32, B, HW, N, Ck,
                                       Cv, torch.device("cpu"))
    out = call()  # (B, 1, HW, Cv)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=generator)
               for shape in ((1, Ck, HW), (B, Ck, N), (B, Cv, N)))
    expected = reference_read(q, k, v, scale=1 / math.sqrt(Ck))[0]
    torch.testing.assert_close(out[:, 0].transpose(1, 2).double(), expected, rtol=1e-4,
                               atol=1e-5)
    call, tensors = kernel.make_inputs("sdpa_flash_split", "fwd+bwd", torch.float32, B, HW, N,
                                       Ck, Cv, torch.device("cpu"))
    call()
    assert len(tensors) == 2 + Cv // Ck  # chunks as wide as the key
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors)


def test_a_cpu_run_times_the_peers_and_records_the_refusals(tmp_path, monkeypatch, capsys):
    """On CPU the cuDNN backend refuses (recorded, not raised), FlexAttention's compile error is
    recorded, the rest are timed; the warm-up is recorded; table and plots name the best peer."""
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(kernel, "measure_memory", lambda spec, device: 1024)

    def no_compiler():
        raise RuntimeError("InductorError: no C++ compiler\nmore lines")
    monkeypatch.setattr(kernel, "_compiled_flex", no_compiler)
    providers = ["torch", "naive", "sdpa", "sdpa_flash_split", "sdpa_cudnn_split", "flex"]
    assert suite.main(["kernel", "--device", "cpu", "--hw", "8", "--ns", "64", "128",
                       "--batches", "1", "--providers", *providers, "--passes", "fwd",
                       "fwd+bwd", "--sweeps", "scaling", "--warmup", "--warmup-s", "0"]) == 0
    [path] = tmp_path.glob("kernel_cpu_*.json")
    payload = json.loads(path.read_text())
    assert payload["warmup"]["series"] == len(providers) * 2
    status = {(r["provider"], r["pass"], r["N"]): r["status"] for r in payload["records"]}
    for pass_ in ("fwd", "fwd+bwd"):
        for provider in ("torch", "naive", "sdpa", "sdpa_flash_split"):
            assert status[(provider, pass_, 64)] == status[(provider, pass_, 128)] == "ok"
        # a peer that cannot run is recorded once per series: larger N are not tried
        assert status[("sdpa_cudnn_split", pass_, 64)].startswith("refused: ")
        assert ("sdpa_cudnn_split", pass_, 128) not in status
        assert status[("flex", pass_, 64)] == "error: RuntimeError: InductorError: no C++ compiler"
    table = capsys.readouterr().out
    assert "| scaling | fwd | fp32 | 1 | 8 | 128 | 512 | 128 |" in table
    assert "| sdpa_cudnn_split | fwd, fwd+bwd | 2 | refused: " in table
    assert {p.name for p in tmp_path.glob("*.png")} == {
        path.stem + "_roofline.png", path.stem + "_memory.png"}
    # the torch read is the fused one on CPU: every row names its best peer
    rows = [line for line in table.splitlines() if line.startswith("| scaling |")]
    assert len(rows) == 4 and all(any(f"| {peer} | **" in row for peer in providers[1:])
                                  for row in rows)
    # every timed point was checked against float64 first: the output, and the gradients of
    # the forward + backward pass, within float32's bounds
    for r in payload["records"]:
        if r["status"] == "ok":
            names = {"out", "dq", "dk", "dv"} if r["pass"] == "fwd+bwd" else {"out"}
            assert set(r["errors"]) == names and r["error_bound"] == 2e-5, r
            assert all(0 <= error < 2e-5 * 3 for error in r["errors"].values()), r


def test_a_provider_over_its_bound_is_reported_wrong_and_not_timed(tmp_path, monkeypatch):
    """A peer whose read is off float64 (here SDPA with its scale doubled) is recorded as
    wrong with its error, and never timed; the next N is checked afresh."""
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(kernel, "measure_memory", lambda spec, device: 1024)
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(kernel.F, "scaled_dot_product_attention",
                        lambda q, k, v, scale: real(q, k, v, scale=2 * scale))
    timed = []
    real_time = kernel.common.time_ms
    monkeypatch.setattr(kernel.common, "time_ms",
                        lambda call, device, **options: timed.append(call) or
                        real_time(call, device, **options))
    assert suite.main(["kernel", "--device", "cpu", "--hw", "8", "--ns", "64", "128",
                       "--batches", "1", "--providers", "torch", "sdpa", "--passes", "fwd",
                       "fwd+bwd", "--sweeps", "scaling", "--full"]) == 0
    [path] = tmp_path.glob("kernel_cpu_*.json")
    records = json.loads(path.read_text())["records"]
    wrong = [r for r in records if r["provider"] == "sdpa"]
    assert [(r["pass"], r["N"]) for r in wrong] == [("fwd", 64), ("fwd", 128),
                                                    ("fwd+bwd", 64), ("fwd+bwd", 128)]
    for r in wrong:
        assert r["status"].startswith("wrong: ") and "median_ms" not in r
        assert max(r["errors"].values()) > 1e-2  # a doubled scale is far off
    assert all(r["status"] == "ok" for r in records if r["provider"] == "torch")
    assert len(timed) == 1 + 4  # the same run's matmul, then the torch read's points alone
    table = kernel.summary(json.loads(path.read_text()))
    assert "| sdpa | fwd, fwd+bwd | 4 | wrong: out off float64 by" in table


def test_the_accuracy_check_reads_every_layout_back_as_the_reads():
    """check_point converts each provider's output and gradients to the read's layout: the
    attention layout's query gradient summed over the objects, the split value's chunks
    concatenated; every right provider passes, at float32's bound."""
    for provider in ("torch", "naive", "sdpa", "sdpa_flash_split"):
        for pass_ in ("fwd", "fwd+bwd"):
            errors, bound, status = kernel.check_point(
                provider, pass_, torch.float32, 3, 20, 50, 16, 48, torch.device("cpu"), "fp32")
            assert status is None and bound == 2e-5, (provider, pass_, errors)
            assert set(errors) == ({"out", "dq", "dk", "dv"} if pass_ != "fwd" else {"out"})


def test_the_gpu_plan_runs_every_peer_at_the_three_target_sizes():
    import argparse
    args = argparse.Namespace(sweeps=["targets"], hw=None, providers=None, passes=None,
                              dtypes=None, batches=None, ns=None, shapes_n=None, quick=False,
                              full=True)
    _, series = kernel.plan(torch.device("cuda"), args)
    assert {entry[1] for entry in series} == set(kernel.PROVIDERS)
    assert {(entry[2], tuple(entry[8])) for entry in series} == {
        ("fwd", (16200, 32400, 64800, 162000)), ("fwd+bwd", (16200, 32400, 64800, 162000))}
    # the Gluon candidates change one pass each; each pass's peers come before them, and the
    # dK/dQ kernel (never run on a GPU) comes last of all
    assert [entry[2] for entry in series if entry[1] == "triton_ws"] == ["fwd"]
    assert [entry[2] for entry in series if entry[1] == "triton_ws_bwd"] == ["fwd+bwd"]
    forward = [entry[1] for entry in series if entry[2] == "fwd"]
    assert forward[0] == "triton" and forward[-1] == "triton_ws"
    assert series[-1][1] == "triton_ws_bwd"
    _, series = kernel.plan(torch.device("cpu"), args)
    assert {entry[1] for entry in series} == \
        set(kernel.PROVIDERS) - {"triton", "triton_planned", "triton_graphed", "triton_ws",
                                 "triton_ws_bwd"}


def test_a_cpu_runs_the_quick_form_unless_full_is_asked_for(capsys):
    """`make bench` on a CPU: the quick form (16,200 memory positions at most at the target,
    two scaling sizes), about ten minutes on two cores; --full: every point (hours)."""
    import argparse

    def args(**given):
        return argparse.Namespace(**{**dict(sweeps=["targets", "scaling", "shapes"], hw=None,
                                            providers=["torch"], passes=None, dtypes=None,
                                            batches=None, ns=None, shapes_n=None, quick=False,
                                            full=False), **given})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    _, default = kernel.plan(cpu, args())
    _, full = kernel.plan(cpu, args(full=True))
    assert [entry[8] for entry in default if entry[0] == "targets"] == [[16200]]
    assert [entry[8] for entry in full if entry[0] == "targets"] == [[162000]]
    assert max(n for entry in default for n in entry[8]) == 16200
    assert sum(map(len, (entry[8] for entry in default))) < \
        sum(map(len, (entry[8] for entry in full))) / 2
    assert kernel.is_quick(cpu, args()) and not kernel.is_quick(cpu, args(full=True))
    assert not kernel.is_quick(cuda, args()) and kernel.is_quick(cuda, args(quick=True))
    with pytest.raises(SystemExit):
        kernel.main(["--quick", "--full"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_candidate_has_its_column_but_is_never_the_best_peer():
    """The Gluon forward (triton_ws) is another way of running the fused read: its time is
    compared with the default's, never counted as a peer's, however fast it is."""
    records = [_record("triton", 0.5), _record("sdpa_flash_split", 1.5),
               _record("triton_ws", 0.4),
               _record("triton", 1.0, N=64800), _record("sdpa_flash_split", 2.0, N=64800),
               _record("triton_ws", None, N=64800, status="refused: needs an sm_90 GPU")]
    payload = _payload(records)
    assert kernel.peers_of(payload) == ["sdpa_flash_split"]
    assert kernel.candidates_of(payload) == ["triton_ws"]
    assert kernel.best_peer(payload, records[0]) == ("sdpa_flash_split", 3.0)
    table = kernel.summary(payload)
    assert "| best peer | vs best peer | vs sdpa_flash_split | vs triton_ws | naive" in table
    assert ("| 16200 | 0.500 | 1.00 | 0% | 1.0 | - | sdpa_flash_split | **3.00x** | 3.00x | "
            "0.80x |") in table
    assert ("| 64800 | 1.000 | 1.00 | 0% | 1.0 | - | sdpa_flash_split | **2.00x** | 2.00x | "
            "refused |") in table
    assert "| triton_ws | fwd | 1 | refused: needs an sm_90 GPU |" in table
    assert "below 1, the candidate was faster" in table


def test_the_gluon_candidate_is_refused_with_its_reason_where_it_cannot_run():
    """On CPU tensors the Gluon forward cannot run: the candidate is refused with the reason
    (never timed as the plain forward it would fall back to)."""
    with pytest.raises(RuntimeError, match="the Gluon forward does not run here: "):
        kernel.make_inputs("triton_ws", "fwd", torch.float32, 1, 8, 64, 16, 32,
                           torch.device("cpu"))
    record = kernel.run_point("triton_ws", "fwd", "fp32", 1, 8, 64, 16, 32, torch.device("cpu"),
                              "targets")
    assert record["status"].startswith("refused: the Gluon forward does not run here: ")


def test_the_gluon_backward_candidate_is_refused_with_its_reason_where_it_cannot_run():
    with pytest.raises(RuntimeError, match="the Gluon dK/dQ kernel does not run here: "):
        kernel.make_inputs("triton_ws_bwd", "fwd+bwd", torch.float32, 1, 8, 64, 16, 32,
                           torch.device("cpu"))
    record = kernel.run_point("triton_ws_bwd", "fwd+bwd", "fp32", 1, 8, 64, 16, 32,
                              torch.device("cpu"), "targets")
    assert record["status"].startswith("refused: the Gluon dK/dQ kernel does not run here: ")


def test_the_gluon_backward_candidate_checks_the_padded_layout(monkeypatch):
    """triton_ws_bwd asks the kernel about q and dO as the backward pads them (16-element
    rows: HW = 1,620 is not), each Gluon kernel's (dV with the contiguous dv it is
    given), and its read opts the backward in: on CPU it warns and takes the plain kernels,
    with the plain read's gradients."""
    from stm_kernels.backends.triton import running
    from stm_kernels.experimental import gluon_backward, gluon_backward_dv
    monkeypatch.setattr(running, "_warned", set())
    dkdq_checked, dv_checked = [], []
    monkeypatch.setattr(gluon_backward, "unsupported_reason",
                        lambda q, k, v, do, config: dkdq_checked.append((q, do)))
    monkeypatch.setattr(gluon_backward_dv, "unsupported_reason",
                        lambda q, k, do, dv, config: dv_checked.append((q, do, dv)))
    # fp16: a float32 read on CPU takes the torch backend (exact float32), no kernels at all
    call, tensors = kernel.make_inputs("triton_ws_bwd", "fwd+bwd", torch.float16, 2, 20, 64,
                                       16, 32, torch.device("cpu"))
    [(q, do)], [(q_dv, do_dv, dv)] = dkdq_checked, dv_checked
    assert q.shape == (1, 16, 20) and q.stride(1) == 32 and do.shape == (2, 32, 20)
    assert do.stride(1) == 32
    assert q_dv.stride() == q.stride() and do_dv.stride() == do.stride()
    assert dv.shape == (2, 32, 64) and dv.is_contiguous()
    monkeypatch.setattr(gluon_backward, "unsupported_reason", lambda *args: "needs CUDA")
    with pytest.warns(RuntimeWarning, match="STM_KERNELS_WARP_SPECIALIZED_BACKWARD=1 ignored"):
        call()
    grads = [t.grad.clone() for t in tensors]
    plain, plain_tensors = kernel.make_inputs("triton", "fwd+bwd", torch.float16, 2, 20, 64,
                                              16, 32, torch.device("cpu"))
    plain()
    for grad, tensor in zip(grads, plain_tensors, strict=True):
        assert torch.equal(grad, tensor.grad)


def test_the_gluon_candidate_reads_the_fused_reads_layout(monkeypatch):
    """triton_ws is memory_read with the Gluon forward: (B, C, L) tensors as for triton, never
    SDPA's (B, 1, L, C), which the Gluon forward would refuse on every GPU."""
    from stm_kernels.backends.triton import running
    monkeypatch.setattr(running, "_warned", set())  # the warning below, whatever ran before
    checked = []
    monkeypatch.setattr(kernel, "_warp_specialized_reason",
                        lambda q, k, v: checked.append((q.shape, k.shape, v.shape)))
    call, _ = kernel.make_inputs("triton_ws", "fwd", torch.float32, 2, 8, 64, 16, 32,
                                 torch.device("cpu"))
    assert checked == [((1, 16, 8), (2, 16, 64), (2, 32, 64))]
    triton, _ = kernel.make_inputs("triton", "fwd", torch.float32, 2, 8, 64, 16, 32,
                                   torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="STM_KERNELS_WARP_SPECIALIZED=1 ignored"):
        out = call()  # on CPU the opted-in read warns and takes the plain forward
    assert out.shape == (2, 32, 8) and torch.allclose(out, triton(), atol=1e-5)


def test_a_gluon_candidate_that_fell_back_to_the_plain_forward_is_refused():
    import warnings

    def fell_back():
        warnings.warn("STM_KERNELS_WARP_SPECIALIZED=1: the Gluon forward failed on H100 (x); "
                      "using the plain Triton forward", RuntimeWarning, stacklevel=2)
    assert kernel.probe("triton_ws", fell_back).startswith(
        "refused: STM_KERNELS_WARP_SPECIALIZED=1: the Gluon forward failed")
    assert kernel.probe("triton_ws", lambda: None) is None
    assert kernel.probe("sdpa_flash_split", fell_back) is None  # only the candidate's warning


# --------------------------------------------------------------------------- the README plot


def test_the_readme_plot_is_drawn_from_the_newest_gpu_run_with_a_curve(tmp_path):
    """From the committed results: the newest GPU run whose scaling sweep measured the fused
    forward at three or more sizes (a curve); the PNG names its source."""
    runs = report.kernel_runs()
    chosen = kernel.read_plot_run(runs)
    assert chosen["device_type"] == "cuda"
    curves = [run for run in runs if run["device_type"] == "cuda" and sum(
        r["status"] == "ok" for r in kernel.read_plot_points(run, ("scaling",)).get(
            ("triton", "fwd"), {}).values()) >= 3]
    assert chosen["_file"] == max(curves, key=lambda run: run["date"])["_file"]
    target = tmp_path / "images" / "gpu_read.png"
    assert kernel.read_plot(chosen, target, source=chosen["_file"]) == [target]
    assert report.plot_source(target) == chosen["_file"]
    # the committed plot is the one `bench report` draws now
    assert report.gpu_plot(check=True) == (chosen["_file"], True), "run python -m bench report"


def test_the_readme_plot_marks_out_of_memory_and_takes_the_later_of_two_measures(tmp_path):
    records = [_record("triton", 2.0, N=64800), _record("triton", 0.5, N=16200),
               _record("triton", 0.9, N=64800),  # re-measured warm later in the run
               _record("triton", 1.4, N=162000), _record("sdpa", 4.0, N=64800),
               _record("naive", 50.0, N=16200), _record("naive", None, N=64800, status="oom"),
               _record("triton", 3.0, pass_="fwd+bwd", N=162000)]
    payload = dict(_payload(records), torch="2", triton="3", date="2026-11-27T00:00:00")
    points = kernel.read_plot_points(payload)
    assert points[("triton", "fwd")][64800]["median_ms"] == 0.9
    assert points[("naive", "fwd")][64800]["status"] == "oom"
    older = dict(payload, date="2026-11-26T00:00:00", records=records[:1])
    assert kernel.read_plot_run([older, payload]) is payload
    # a newer run of the target points alone: a scaling sweep's curve stays the plot's
    swept = dict(payload, records=[dict(record, sweep="scaling") for record in records])
    targets = dict(payload, date="2026-11-28T00:00:00")
    assert kernel.read_plot_run([older, swept, targets]) is swept
    assert kernel.read_plot_run([dict(payload, device_type="cpu")]) is None
    [path] = kernel.read_plot(payload, tmp_path / "plot.png", source="x.json")
    assert path.stat().st_size > 10_000 and report.plot_source(path) == "x.json"


@pytest.mark.parametrize("status, word", [("oom", "oom"), ("refused: no kernel", "refused"),
                                          ("error: X: y", "error"),
                                          ("not run (a call at the previous N took over 4 s)",
                                           "not run")])
def test_status_words(status, word):
    assert kernel._status_word(status) == word


def test_a_candidates_verdict_names_the_memory_size_it_is_faster_from():
    """Each candidate's verdict against the fused read: where it was at least 3% faster, and
    from which N on it stayed faster: the tilings entry that would make it a default there."""
    records = [_record("triton", 0.40), _record("triton_ws", 0.45),
               _record("triton", 0.50, N=64800), _record("triton_ws", 0.49, N=64800),
               _record("triton", 0.75, N=162000), _record("triton_ws", 0.60, N=162000),
               _record("triton", 2.0, pass_="fwd+bwd"),
               _record("triton_ws_bwd", 1.5, pass_="fwd+bwd"),
               _record("triton", 4.0, pass_="fwd+bwd", N=162000),
               _record("triton_ws_bwd", 4.1, pass_="fwd+bwd", N=162000),
               _record("triton", 9.0, pass_="fwd+bwd", N=324000),
               _record("triton_ws_bwd", None, pass_="fwd+bwd", N=324000,
                       status="refused: needs an sm_90 GPU")]
    payload = _payload(records)
    forward, backward = kernel.candidate_verdicts(payload)
    # 0.49 against 0.50 is within the 3% margin: not faster there
    assert forward == dict(candidate="triton_ws", **{"pass": "fwd"}, dtype="bf16", B=1,
                           HW=1620, Ck=128, Cv=512, ns=[16200, 64800, 162000], faster=[162000],
                           faster_from=162000)
    assert (backward["ns"], backward["faster"], backward["faster_from"]) == (
        [16200, 162000], [16200], None)  # faster at the smaller N only: no default
    table = kernel.summary(payload)
    assert ('| triton_ws | fwd | bf16 | 1 | 1620 | 128 | 512 | 16200, 64800, 162000 | 162000 | '
            '162000 | '
            '{"forward": 162000} |') in table
    assert ('| triton_ws_bwd | fwd+bwd | bf16 | 1 | 1620 | 128 | 512 | 16200, 162000 | 16200 | '
            'never | '
            'not faster: stays opt-in |') in table
    records[3]["median_ms"] = 0.40
    forward = kernel.candidate_verdicts(_payload(records))[0]
    assert forward["faster_from"] == 64800
    assert '{"forward": 64800}' in kernel.summary(_payload(records))
    assert "Candidates against" not in kernel.summary(_payload(records[:1]))


@pytest.mark.skipif(not kernel.common.torch.cuda.is_available() and
                    __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels on CPU need TRITON_INTERPRET=1")
def test_the_planned_call_mode_reads_what_the_op_reads_and_is_never_a_peer():
    """triton_planned (prepare_read's run) computes the fused read, forward and gradients,
    within float32's bounds (check_point, in the interpreter here); triton_graphed refuses
    without a CUDA GPU; in the table both are "vs" columns of the fused read, never its best
    peer."""
    for pass_ in ("fwd", "fwd+bwd"):
        errors, _, status = kernel.check_point("triton_planned", pass_, torch.float32, 2, 20,
                                               50, 16, 24, torch.device("cpu"), "fp32")
        assert status is None and set(errors) >= {"out"}, (pass_, errors)
    call, tensors = kernel.make_inputs("triton_planned", "fwd+bwd", torch.float32, 2, 20, 50,
                                       16, 24, torch.device("cpu"))
    call()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        kernel.make_inputs("triton_graphed", "fwd", torch.float32, 2, 20, 50, 16, 24,
                           torch.device("cpu"))
    records = [_record("triton", 0.5, kernel_ms=0.25), _record("triton_planned", 0.4),
               _record("triton_graphed", 0.3), _record("sdpa", 1.0)]
    payload = _payload(records)
    assert kernel.peers_of(payload) == ["sdpa"] and kernel.modes_of(payload) == [
        "triton_planned", "triton_graphed"]
    assert kernel.best_peer(payload, records[0]) == ("sdpa", 2.0)
    table = kernel.summary(payload)
    assert "| ms | kernel ms | wall / kernel | TFLOP/s |" in table
    assert ("| 16200 | 0.500 | 0.250 | 2.00x | 1.00 | 0% | 1.0 | - | sdpa | **2.00x** | 0.80x "
            "| 0.60x | 2.00x |") in table
