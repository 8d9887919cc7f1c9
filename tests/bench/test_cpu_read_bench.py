"""`python -m bench cpu-read`: the CPU read against SDPA, the official read and FlexAttention in
one interleaved run (tiny sizes), and the comparison it reports."""
import json

import pytest

from bench import cpu_read


def test_every_provider_is_timed_and_compared(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(cpu_read, "SGEMM_SIZE", 128)
    providers = ["stm", "sdpa", "official", "products", "sgemm"]
    assert cpu_read.main(["--ns", "96", "200", "--hw", "16", "--ck", "8", "--cv", "24",
                          "--rounds", "3", "--providers", *providers]) == 0
    [path] = tmp_path.glob("cpu_read_cpu_*.json")
    payload = json.loads(path.read_text())
    assert (tmp_path / (path.stem + ".png")).exists()
    assert payload["providers"] == providers and payload["busy"] is False
    assert payload["threads"] >= 1
    records = {(r["provider"], r["N"]): r for r in payload["records"]}
    assert set(records) == {(p, N) for p in providers for N in (96, 200)}
    for (provider, N), record in records.items():
        assert record["status"] == "ok" and record["q20_ms"] <= record["median_ms"]
        # the reads were checked against float64 before they were timed; products are not reads
        if provider in ("stm", "sdpa", "official"):
            assert record["error_bound"] == 2e-5 and 0 <= record["errors"]["out"] < 2e-5
        else:
            assert "errors" not in record
        flops = 2 * 128 ** 3 if provider == "sgemm" else 2 * 16 * N * (8 + 24)
        assert record["gflops"] == pytest.approx(flops / (record["median_ms"] * 1e-3) / 1e9)
    found = cpu_read.comparison(payload["records"], 200)
    peers = {p: records[(p, 200)]["median_ms"] for p in ("sdpa", "official")}
    assert found["best_peer"] == min(peers, key=peers.get)
    assert found["stm_vs_best_peer"] == pytest.approx(
        min(peers.values()) / records[("stm", 200)]["median_ms"])
    assert found["products_vs_best_peer"] == pytest.approx(
        min(peers.values()) / records[("products", 200)]["median_ms"])
    assert found["stm_of_gemm"] == pytest.approx(
        records[("stm", 200)]["gflops"] / records[("sgemm", 200)]["gflops"])
    assert "| 200 |" in capsys.readouterr().out


def test_the_products_are_the_reads_two_products_without_the_softmax(monkeypatch):
    monkeypatch.setattr(cpu_read, "CPU_CHUNK", 7)  # ragged: 30 positions in chunks of 7
    generator = cpu_read.torch.Generator().manual_seed(1)
    q, k, v = (cpu_read.torch.randn(1, c, n, generator=generator)
               for c, n in ((5, 11), (5, 30), (6, 30)))
    expected = (q[0].double().T @ k[0].double()) @ v[0].double().T
    cpu_read.torch.testing.assert_close(cpu_read._products(q, k, v).double(), expected,
                                        rtol=0, atol=1e-4)


def test_a_peer_that_does_not_compile_is_recorded_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))

    def no_compiler(*tensors):
        raise RuntimeError("InductorError: no C++ compiler\nmore lines")
    monkeypatch.setattr(cpu_read, "_compiled_flex", no_compiler)
    assert cpu_read.main(["--ns", "64", "--hw", "8", "--ck", "8", "--cv", "8", "--rounds",
                          "2", "--providers", "stm", "flex"]) == 0
    [path] = tmp_path.glob("cpu_read_cpu_*.json")
    records = {r["provider"]: r for r in json.loads(path.read_text())["records"]}
    assert records["flex"]["status"] == ("error: RuntimeError: InductorError: no C++ compiler")
    assert records["stm"]["status"] == "ok"
    assert cpu_read.comparison(list(records.values()), 64)["best_peer"] is None


def test_a_competing_process_runs_only_inside_the_block(monkeypatch):
    started = []
    real = cpu_read.subprocess.Popen

    def popen(command, **options):
        started.append(real(command, **options))
        return started[-1]
    monkeypatch.setattr(cpu_read.subprocess, "Popen", popen)
    with cpu_read.competing_process(True):
        (process,) = started
        assert process.poll() is None  # spinning
    assert process.poll() is not None  # gone after the block
    with cpu_read.competing_process(False):
        assert len(started) == 1


@pytest.mark.parametrize("has_bf16", [True, False], ids=["bf16-dot", "no-bf16-dot"])
def test_bf16_inputs_are_compared_with_the_float32_read_and_sdpa(tmp_path, monkeypatch, capsys,
                                                                 has_bf16):
    """--dtype bf16: the read on bf16 inputs against its own float32 read (speed and relative
    error), SDPA on float32 and bf16 inputs and the bf16 matmul rate; a CPU without bf16 dot
    products says so and states no target."""
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv("STM_KERNELS_CPU_BF16", "1" if has_bf16 else "0")
    monkeypatch.setattr(cpu_read, "SGEMM_SIZE", 64)
    providers = ["stm", "stm_fp32", "sdpa", "sdpa_split", "sdpa_fp32", "products", "bgemm"]
    assert cpu_read.main(["--dtype", "bf16", "--ns", "200", "--hw", "16", "--ck", "8", "--cv",
                          "24", "--rounds", "3", "--providers", *providers]) == 0
    [path] = tmp_path.glob("cpu_read_cpu_*.json")
    payload = json.loads(path.read_text())
    assert payload["dtype"] == "bf16" and payload["bf16_dot_products"] is has_bf16
    assert payload["cpu_model"] and payload["threads"] >= 1
    records = [r for r in payload["records"] if r["status"] == "ok"]
    assert {r["provider"] for r in records} == set(providers)
    [accuracy] = [r for r in payload["records"] if r["status"] == "accuracy"]
    assert 0 < accuracy["relative_error_vs_fp32"] < 1e-2
    found = cpu_read.comparison(payload["records"], 200)
    times = {r["provider"]: r["median_ms"] for r in records}
    assert found["stm_vs_fp32"] == pytest.approx(times["stm_fp32"] / times["stm"])
    assert found["stm_vs_sdpa_fp32"] == pytest.approx(times["sdpa_fp32"] / times["stm"])
    # the best peer reads the same bf16 inputs; SDPA on float32 ones has its own column
    assert found["best_peer"] == min(("sdpa", "sdpa_split"), key=times.get)
    assert found["stm_over_products"] == pytest.approx(times["stm"] / times["products"])
    assert found["relative_error_vs_fp32"] == accuracy["relative_error_vs_fp32"]
    out = capsys.readouterr().out
    assert "stm vs stm_fp32" in out and "stm / products" in out
    assert ("no speed claim" in out) is not has_bf16 and ("Targets" in out) is has_bf16
    with pytest.raises(SystemExit):
        cpu_read.main(["--providers", "stm_fp32"])  # float32 inputs have no float32 twin


def test_key_scale_draws_peaked_scores_and_is_recorded(tmp_path, monkeypatch, capsys):
    """--key-scale multiplies the keys (a trained model's scores span hundreds): the stm read
    still matches the official one there, the run says so, and its result does not replace a
    run on unit keys."""
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    seen = []
    real = cpu_read.make_calls

    def recorded(N, args):
        calls, skipped, checks = real(N, args)
        seen.append((calls["stm"](), calls["official"]()))
        return calls, skipped, checks
    monkeypatch.setattr(cpu_read, "make_calls", recorded)
    assert cpu_read.main(["--ns", "64", "--hw", "8", "--ck", "16", "--cv", "8", "--rounds",
                          "2", "--providers", "stm", "official", "--key-scale", "40"]) == 0
    [(stm, official)] = seen
    assert (stm - official).abs().max() < 1e-4 * official.abs().max()
    [path] = tmp_path.glob("cpu_read_cpu_*.json")
    payload = json.loads(path.read_text())
    assert payload["key_scale"] == 40.0
    assert "keys 40x unit normals (peaked scores)" in capsys.readouterr().out
    from bench import report
    unit = dict(payload, key_scale=1.0)
    assert report.result_key(unit) != report.result_key(payload)
    del unit["key_scale"]  # results from before the option: unit keys
    assert report.result_key(unit) == report.result_key(dict(payload, key_scale=1.0))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_split_value_sdpa_reads_what_the_full_value_sdpa_reads(dtype):
    """sdpa_split: SDPA on the value in Ck-wide chunks, concatenated: the same read as SDPA with
    the whole value (and as the stm read), only with QK^T recomputed per chunk."""
    import argparse
    args = argparse.Namespace(ck=16, cv=40, hw=12, dtype=dtype, key_scale=1.0,
                              providers=["stm", "sdpa", "sdpa_split"])
    calls, _, checks = cpu_read.make_calls(70, args)
    assert set(checks) == {"stm", "sdpa", "sdpa_split"}  # each read checked against float64
    assert all(status is None for _, _, status in checks.values()), checks
    split, full = calls["sdpa_split"](), calls["sdpa"]()
    assert split.shape == full.shape == (1, 1, 12, 40)
    tolerance = 1e-5 if dtype == "fp32" else 2e-2
    cpu_read.torch.testing.assert_close(split.float(), full.float(), rtol=tolerance,
                                        atol=tolerance)
    stm = calls["stm"]()  # (1, Cv, HW)
    cpu_read.torch.testing.assert_close(split[0, 0].T.float(), stm[0].float(), rtol=tolerance,
                                        atol=tolerance)


def test_a_read_off_float64_is_reported_wrong_and_not_timed(tmp_path, monkeypatch, capsys):
    """A peer whose read is off (here SDPA reading the keys doubled) is recorded as wrong with
    its error, before any timing, and is never a best peer; the others are timed."""
    monkeypatch.setenv("STM_BENCH_RESULTS", str(tmp_path))
    real = cpu_read.F.scaled_dot_product_attention
    monkeypatch.setattr(cpu_read.F, "scaled_dot_product_attention",
                        lambda q, k, v: real(q, 2 * k, v))
    assert cpu_read.main(["--ns", "64", "--hw", "8", "--ck", "8", "--cv", "8", "--rounds",
                          "2", "--providers", "stm", "sdpa", "official"]) == 0
    [path] = tmp_path.glob("cpu_read_cpu_*.json")
    records = {r["provider"]: r for r in json.loads(path.read_text())["records"]}
    assert records["sdpa"]["status"].startswith("wrong: out off float64 by")
    assert "median_ms" not in records["sdpa"] and records["sdpa"]["errors"]["out"] > 1e-2
    assert records["stm"]["status"] == records["official"]["status"] == "ok"
    assert cpu_read.comparison(list(records.values()), 64)["best_peer"] == "official"
    assert "| wrong |" in capsys.readouterr().out
