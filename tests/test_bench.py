"""python -m bench: records, targets and table on the smoke bundle (no timed assertions:
performance targets are the benchmark's business, not the tests')."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import machine, peers, timing
from bench.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
IDS = ("auto", "ort-fp32", "ort-int8-cpu-form", "ort-int8-tensorrt-form", "openvino-fp32", "torch-eager",
       "torch-channels-last-bf16")


@pytest.fixture(scope="module")
def result(smoke_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--bundle", str(smoke_bundle), "--batch-sizes", "1", "3", "--seconds", "0.1", "--rounds", "2",
            "--warmup", "0", "--threads", "1", "--peers", *IDS, "--json", str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), json.loads(out.read_text()), stderr.getvalue()


def test_every_contender_at_every_batch_with_sane_numbers(result):
    code, _, data, _ = result
    assert code == 0
    rows = data["records"]
    assert {(r["id"], r["batch"]) for r in rows} == {(i, b) for i in IDS for b in (1, 3)}
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"], r
        assert r["rounds"] == 2 and r["calls"] >= 2 * 3
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert r["x_ort_fp32"] > 0 and r["x_best_torch"] > 0


def test_runtime_contenders_are_timed_end_to_end_and_torch_peers_are_not(result):
    rows = result[2]["records"]
    for r in rows:
        runtime_with_converter = r["family"] == "runtime" and r["id"] != "ort-int8-tensorrt-form"
        assert ("convert_p50_ms" in r) == runtime_with_converter, r["id"]
        if runtime_with_converter:
            assert r["convert_p50_ms"] > 0 and r["convert_rounds"] == 2


def test_errors_are_against_eager_on_the_same_inputs_and_costs_come_from_the_manifest(result):
    by = {(r["id"], r["batch"]): r for r in result[2]["records"]}
    for batch in (1, 3):
        assert by[("torch-eager", batch)]["max_abs_err"] == 0.0
        assert by[("ort-fp32", batch)]["max_abs_err"] < 1e-4
        assert by[("openvino-fp32", batch)]["max_abs_err"] < 1e-4
        assert 0 < by[("ort-int8-cpu-form", batch)]["max_abs_err"] < 0.5
        assert by[("torch-channels-last-bf16", batch)]["max_abs_err"] < 0.1
        assert by[("ort-fp32", batch)]["x_ort_fp32"] == pytest.approx(1.0)
    assert by[("ort-int8-cpu-form", 1)]["nll_cost"] is not None  # the manifest's "int8-cpu" figure
    assert by[("ort-int8-cpu-form", 1)]["nll_cost"] != by[("ort-int8-tensorrt-form", 1)]["nll_cost"]


def test_json_says_which_machine_and_the_targets(result):
    data = result[2]
    assert data["machine"]["cpu"] and isinstance(data["machine"]["flags"], list)
    assert {"native_bf16", "native_int8", "load_avg_start", "load_avg_end", "openvino"} <= set(data["machine"])
    assert any("auto convert / ONNX Runtime fp32" in k for k in data["targets"])
    assert any("batch 1: auto convert p50 ms" in k for k in data["targets"])
    assert data["meta"]["flops"] > 0 and "python -m bench" in data["meta"]["command"]


def test_markdown_has_a_row_per_contender_and_batch(result):
    _, stdout, data, _ = result
    for r in data["records"]:
        assert f"| {r['id']} | {r['precision']} | {r['batch']} |" in stdout
    assert "load average" in stdout and "Targets (issue 13)" in stdout


def test_a_contender_that_cannot_run_is_kept_with_its_reason(tmp_path, smoke_bundle):
    made = peers.build_peers(["ort-int8-tensorrt-form"], tmp_path / "absent", 1)
    assert made[0].reason and "BundleError" in made[0].reason


def test_flops_match_the_architecture(smoke_bundle):
    from vce_deploy.bundle import Bundle

    config = Bundle.load(smoke_bundle).manifest.model_config
    c, blocks, k, s = config["channels"], config["blocks"], config["latent_per_row"], config["image_size"]
    hw = s * s
    expected = 2 * c * (1 + k) * 9 * hw + 2 * blocks * 2 * c * c * 9 * hw + 2 * c * 25 * hw  # stem, blocks, head
    assert machine.flops_per_conversion(peers._convertor(smoke_bundle)) == expected


def test_interleave_gives_every_contender_every_round():
    calls = []
    cells = timing.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, 0.0, 3, min_calls=1)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # the order rotates each round
    assert all(len(c.round_rates) == 3 and len(c.times_ns) == 3 for c in cells.values())
    assert np.isfinite(cells["a"].stats()["images_per_s"])


def test_bench_imports_neither_onnx_nor_the_exporter():
    code = ("import sys, bench.__main__, bench.peers, bench.report, bench.profile, bench.run; "
            "bad = [m for m in ('onnx', 'export', 'train') if m in sys.modules]; assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_bad_options_are_usage_errors(capsys):
    for argv in (["--batch-sizes", "0"], ["--peers", "no-such-peer"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2


def test_contenders_are_counted_once_and_backend_info_printed_once(result):
    _, stdout, data, log = result
    for batch in (1, 3):
        assert f"batch {batch}: {len(IDS)} contenders x 2 rounds done" in log  # not one per engine and convert call
    assert stdout.count("auto picked") == 1, "auto's backend_info is printed under Contenders only"
    best = next(r["best_torch"] for r in data["records"] if r["batch"] == 3)
    assert best.startswith("torch-") and f"batch 3: {best}" in stdout  # the strongest PyTorch peer is named


def test_latency_script_is_the_same_benchmark_with_its_help_whole():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--help"], capture_output=True,
                          text=True, cwd=ROOT.parent, timeout=60)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "usage: python -m bench" in text and "--peers" in text
    assert "exporter (the bundle is the shipped default one unless --bundle names another)." in text


def test_vce_bench_runs_the_benchmark_in_a_clone_and_says_where_it_runs_elsewhere(capfd, monkeypatch, tmp_path):
    from vce_deploy import cli

    assert cli.main(["bench", "--help"]) == 0  # bench's own --help: the source tree's benchmark was found
    assert "usage: python -m bench" in capfd.readouterr().out
    monkeypatch.setattr(cli, "BENCH_SCRIPT", tmp_path / "bench" / "latency.py")  # as from a wheel
    assert cli.main(["bench", "--seconds", "1"]) == 1
    err = capfd.readouterr().err
    assert "which the wheel does not ship" in err and "python bench/latency.py" in err


def test_peer_nll_pairs_each_convertor_with_the_fp32_runtime(smoke_bundle, tmp_path):
    """bench.peer_nll: fp32 PyTorch draws what ONNX Runtime fp32 draws (cost ~0), int8 costs
    something, and a contender that does not exist is a usage error naming the choices."""
    from bench.peer_nll import main as peer_nll_main

    out = tmp_path / "costs.json"
    assert peer_nll_main(["--bundle", str(smoke_bundle), "--split", "small", "--targets", "6", "--k", "8",
                          "--peers", "torch-eager", "ort-int8-cpu-form", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["peers"]
    assert rows["ort-fp32"]["cost_vs_fp32"] == 0.0 and rows["ort-fp32"]["targets"] == 6
    assert abs(rows["torch-eager"]["cost_vs_fp32"]) < 1e-3, rows["torch-eager"]
    assert rows["ort-int8-cpu-form"]["cost_vs_fp32"] != 0.0
    with pytest.raises(SystemExit):
        peer_nll_main(["--peers", "no-such-peer"])
