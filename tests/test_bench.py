"""bench/latency.py: records, table and plot on the smoke bundle (no timed assertions:
performance targets are the benchmark's business, not the tests')."""
from __future__ import annotations

import json
import math

import pytest

from bench import latency

REQUIRED = ("backend", "precision", "batch_size", "p50_ms", "p90_ms", "p99_ms", "images_per_s",
            "speedup_vs_eager", "max_abs_err", "share_of_peak")


@pytest.fixture(scope="module")
def run(smoke_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--bundle", str(smoke_bundle), "--batch-sizes", "1", "2", "--seconds", "0.05", "--rounds", "2",
            "--warmup", "0", "--threads", "1", "--peak-size", "256",
            "--backends", "torch-eager", "torch-channels-last", "ort-cpu-fp32", "ort-cpu-int8", "tensorrt-fp16",
            "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    return argv, out


@pytest.fixture(scope="module")
def result(run):
    import contextlib
    import io

    argv, out = run
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = latency.main(argv)
    return code, stdout.getvalue(), json.loads((out / "bench.json").read_text()), out


def test_exit_code_and_record_keys(result):
    code, _, records, _ = result
    assert code == 0
    assert isinstance(records, list) and records
    for record in records:
        assert set(REQUIRED) <= set(record), sorted(set(REQUIRED) - set(record))


def test_every_runnable_backend_has_sane_numbers_at_every_batch(result):
    _, _, records, _ = result
    ran = [r for r in records if r["skipped"] is None]
    seen = {(r["id"], r["batch_size"]) for r in ran}
    assert seen == {(i, b) for i in ("torch-eager", "torch-channels-last", "ort-cpu-fp32", "ort-cpu-int8")
                    for b in (1, 2)}
    for r in ran:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"], r
        assert r["calls"] >= 5
        # images/s is batch * calls / time in calls, so it sits between the slowest and fastest call's rate
        assert r["batch_size"] * 1e3 / r["p99_ms"] * 0.5 < r["images_per_s"] < r["batch_size"] * 1e3 / r["p50_ms"] * 50
        assert r["share_of_peak"] > 0 and math.isclose(
            r["share_of_peak"], r["images_per_s"] * r["flops_per_image"] / 1e9 / r["peak_gflops"], rel_tol=1e-9)
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_best_torch"] > 0


def test_speedups_and_errors_are_against_eager_on_the_same_inputs(result):
    _, _, records, _ = result
    by = {(r["id"], r["batch_size"]): r for r in records if r["skipped"] is None}
    for batch in (1, 2):
        eager = by[("torch-eager", batch)]
        assert eager["speedup_vs_eager"] == pytest.approx(1.0)
        assert eager["max_abs_err"] == 0.0
        best = max(by[(i, batch)]["images_per_s"] for i in ("torch-eager", "torch-channels-last"))
        ort = by[("ort-cpu-fp32", batch)]
        assert ort["speedup_vs_eager"] == pytest.approx(ort["images_per_s"] / eager["images_per_s"])
        assert ort["speedup_vs_best_torch"] == pytest.approx(ort["images_per_s"] / best)
        assert ort["max_abs_err"] < 1e-4  # the exporter's fp32 tolerance
        assert 0 < by[("ort-cpu-int8", batch)]["max_abs_err"] < 0.25  # int8 differs, within its tolerance
        assert by[("torch-channels-last", batch)]["max_abs_err"] < 1e-5


def test_convert_is_timed_for_runtime_backends_and_matches_the_engine_inputs(result):
    _, _, records, _ = result
    for r in records:
        if r["skipped"] is not None:
            continue
        if r["id"] == "torch-channels-last":  # a PyTorch peer, not a vce_deploy backend
            assert r["convert_p50_ms"] is None
            continue
        assert r["convert_p50_ms"] > 0 and r["convert_images_per_s"] > 0
        # the bare call gets exactly the batch Converter.convert builds: same outputs
        assert r["convert_vs_engine_max_abs"] == 0.0, r["id"]


def test_backend_that_cannot_run_is_listed_with_its_reason(result):
    _, stdout, records, _ = result
    skipped = [r for r in records if r["id"] == "tensorrt-fp16"]
    assert len(skipped) == 1 and skipped[0]["batch_size"] is None and skipped[0]["p50_ms"] is None
    assert "TensorRT" in skipped[0]["skipped"] or "tensorrt" in skipped[0]["skipped"]
    assert "| tensorrt-fp16 |" in stdout and skipped[0]["skipped"] in stdout


def test_markdown_has_a_row_per_backend_and_batch_and_the_machine(result):
    _, stdout, records, _ = result
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    for r in records:
        if r["skipped"] is None:
            assert any(line.startswith(f"| {r['backend']} | {r['precision']} | {r['batch_size']} |") for line in rows), r["id"]
    assert "## Machine" in stdout and "GFLOP/s" in stdout and "load average" in stdout


def test_plot_is_a_png(result):
    out = result[3]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_match_the_architecture(smoke_bundle):
    from vce_deploy.bundle import Bundle

    bundle = Bundle.load(smoke_bundle)
    config = bundle.manifest.model_config
    c, blocks, k, s = config["channels"], config["blocks"], config["latent_per_row"], config["image_size"]
    hw = s * s
    expected = (2 * c * (1 + k) * 9 * hw + c * hw  # stem conv + bias
                + 2 * blocks * (2 * c * c * 9 * hw + c * hw)  # two 3x3 convs per residual block
                + 2 * 1 * c * 25 * hw + hw)  # 5x5 head to one channel
    flops = latency.count_flops(bundle.file(bundle.model_entry("convertor", "fp32").path))
    assert flops["conv_flops"] == expected
    assert len(flops["convs"]) == 2 + 2 * blocks
    assert flops["flops"] > flops["conv_flops"]  # relu, add, sigmoid


def test_onnxruntime_profile_attributes_time_to_convs(smoke_bundle):
    from vce_deploy.bundle import Bundle

    bundle = Bundle.load(smoke_bundle)
    image, _ = latency.condition_image()
    z, q = latency.engine_inputs(image, 4, bundle.manifest.latent_dim)
    prof = latency.profile_onnxruntime(bundle, "fp32", 4, 1, z, q, runs=3, warmup=1)
    assert prof["runs"] == 3 and prof["run_ms"] > 0
    assert "Conv" in prof["per_op_ms"]
    assert sum(prof["nodes"].values()) >= len(latency.count_flops(bundle.file(bundle.model_entry("convertor", "fp32").path))["convs"])


def test_missing_default_bundle_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(latency, "DEFAULT_BUNDLE", tmp_path / "nothing")
    assert latency.main(["--seconds", "0.01"]) == 1
    err = capsys.readouterr().err
    assert "--bundle" in err and "--untrained" in err


def test_bad_options_are_usage_errors(smoke_bundle, capsys):
    assert latency.main(["--bundle", str(smoke_bundle), "--batch-sizes", "0"]) == 2
    assert latency.main(["--backends", "no-such-backend"]) == 2


def test_torch_threads_are_restored(smoke_bundle):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    latency.main(["--bundle", str(smoke_bundle), "--batch-sizes", "1", "--seconds", "0.01", "--rounds", "1",
                  "--warmup", "0", "--threads", str(before + 1), "--peak-size", "64", "--backends", "ort-cpu-fp32"])
    assert torch.get_num_threads() == before
