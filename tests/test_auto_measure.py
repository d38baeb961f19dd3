"""precision="auto" by measurement (vce_deploy/backends/measure.py): timed once, cached by what
it depends on, a bad cache measured again, and the choice is the measured fastest, whatever
this CPU is (the timings here are stated, not this machine's, except in the first test)."""
from __future__ import annotations

import json

import pytest

from vce_deploy import Converter
from vce_deploy.backends import BACKENDS, auto, measure
from vce_deploy.bundle import Bundle
from vce_deploy.cpu import CPU_CLASSES


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "vce_deploy" / "auto"


def stated(table):
    """A measure() that returns `table` (backend, precision, images/s) instead of timing."""
    calls = []

    def fake(candidates, bundle, threads, budget_s=measure.BUDGET_S):
        calls.append([(cls.name, p) for cls, p in candidates])
        rows = {(b, p): rate for b, p, rate in table}
        return [measure.Timing(cls.name, p, threads, 0.5, rows[(cls.name, p)]) if (cls.name, p) in rows else
                measure.Timing(cls.name, p, threads, note="not measured: stated table") for cls, p in candidates], {}

    fake.calls = calls
    return fake


def test_first_load_measures_and_caches_later_loads_read_the_cache(bundle, cache, monkeypatch):
    conv = Converter.load(bundle, precision="auto", threads=1, measure=True)
    reason = conv.backend_info.reason
    assert "auto measured" in reason and "first load here: measured" in reason
    assert "images/s at batch 64" in reason and "onnxruntime fp32 x1" in reason
    files = list(cache.glob("*.json"))
    assert len(files) == 1
    monkeypatch.setattr(measure, "measure", lambda *a, **k: pytest.fail("a matching cache was measured again"))
    again = Converter.load(bundle, precision="auto", threads=1, measure=True)
    assert (again.backend_info.name, again.precision) == (conv.backend_info.name, conv.precision)
    assert f"(cache {files[0]})" in again.backend_info.reason


def test_the_measured_fastest_is_chosen(bundle, cache, monkeypatch):
    fake = stated([("onnxruntime", "fp32", 100.0), ("onnxruntime", "int8", 300.0), ("openvino", "fp32", 200.0)])
    monkeypatch.setattr(measure, "measure", fake)
    conv = Converter.load(bundle, precision="auto", measure=True)
    assert (conv.backend_info.name, conv.precision) == ("onnxruntime", "int8")
    assert "auto measured onnxruntime int8 fastest" in conv.backend_info.reason


@pytest.mark.parametrize("damage", ["garbage", "foreign", "negative"])
def test_a_corrupt_foreign_or_stale_cache_is_measured_again(bundle, cache, monkeypatch, damage):
    monkeypatch.setattr(measure, "measure", stated([("onnxruntime", "fp32", 100.0), ("openvino", "fp32", 50.0)]))
    Converter.load(bundle, precision="auto", measure=True)
    [path] = cache.glob("*.json")
    raw = json.loads(path.read_text())
    if damage == "garbage":
        path.write_text("{not json")
    elif damage == "foreign":  # another thread count's table under this key's name
        raw["key"]["threads"] += 1
        raw["table"] = [{**row, "images_per_s": 1e9 if row["backend"] == "openvino" else 1.0} for row in raw["table"]]
        path.write_text(json.dumps(raw))
    else:
        raw["table"][0]["images_per_s"] = -5.0
        path.write_text(json.dumps(raw))
    fake = stated([("onnxruntime", "fp32", 100.0), ("openvino", "fp32", 50.0)])
    monkeypatch.setattr(measure, "measure", fake)
    conv = Converter.load(bundle, precision="auto", measure=True)
    assert fake.calls, "the bad cache was trusted"
    assert conv.backend_info.name == "onnxruntime" and "measured again" in conv.backend_info.reason
    assert json.loads(path.read_text())["key"] != raw["key"] or damage != "foreign"  # rewritten for this key


def test_the_key_holds_cpu_bundle_versions_and_threads(bundle):
    loaded = Bundle.load(bundle)
    key = measure.cache_key(loaded, CPU_CLASSES["zen3"], 2, [("onnxruntime", "fp32")])
    assert {"cpu_model", "cpu_flags", "bundle_sha256", "versions", "threads"} <= set(key)
    assert measure.cache_path(key) != measure.cache_path({**key, "cpu_flags": sorted(CPU_CLASSES["amx"].flags)})
    assert measure.cache_path(key) != measure.cache_path({**key, "threads": 1})


def test_measuring_is_skipped_by_flag_or_environment(bundle, cache, monkeypatch):
    monkeypatch.setattr(measure, "measure", lambda *a, **k: pytest.fail("measured although asked not to"))
    assert Converter.load(bundle, precision="auto", measure=False).backend_info.reason.startswith("auto picked")
    monkeypatch.setenv(measure.MEASURE_ENV, "0")
    assert Converter.load(bundle, precision="auto").backend_info.reason.startswith("auto picked")
    assert not cache.exists()


def test_the_budget_bounds_measuring(bundle):
    loaded = Bundle.load(bundle)
    candidates, _ = auto.cpu_candidates(BACKENDS, loaded, CPU_CLASSES["zen3"])
    table, instances = measure.measure(candidates, loaded, 1, budget_s=0.0)
    assert instances == {} and all("budget was spent" in row.note for row in table)


def test_candidates_are_those_within_the_nll_bound_whatever_the_flags(bundle, tmp_path):
    from vce_deploy.bundle import write_raw_manifest
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["metrics"].setdefault("nll", {})["int8-cpu"] = {"cost_vs_fp32": 0.08}
    raw["metrics"]["nll"]["fp16"] = {"cost_vs_fp32": 0.9}
    write_raw_manifest(copy, raw)
    found, _ = auto.cpu_candidates(BACKENDS, Bundle.load(copy), CPU_CLASSES["zen3"])
    pairs = [(cls.name, p) for cls, p in found]
    assert ("onnxruntime", "int8") in pairs, "int8 is measured on a CPU without VNNI too"
    assert all(p != "fp16" for _, p in pairs), "a precision over the NLL bound is never timed"
    assert pairs[0] == ("onnxruntime", "fp32")  # the flag plan's order first: fp32 on AVX2 only


class FakeClock:
    """Seconds that pass only when a fake backend says its work took them."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def slow_backend(clock, name, load_s, call_s):
    """A backend class whose load takes load_s and a call call_s per row, on `clock`."""

    class Slow:
        closed = []

        def __init__(self, bundle, precision, device, threads):
            self.precision = precision
            clock.now += load_s

        def run(self, model, feeds):
            clock.now += call_s * feeds["z"].shape[0]

        def close(self):
            Slow.closed.append(self.precision)

    Slow.name = name
    return Slow


def test_the_budget_is_a_hard_bound_loads_and_warm_up_included(bundle):
    """Loads of 0.8 s each: the old rule (start while any time is left) began a third load at
    1.99 s and ended near 2.9 s; a load is now started only if one like it fits in what is left."""
    clock = FakeClock()
    slow = slow_backend(clock, "slow", 0.8, 0.001)
    start = clock.now
    table, instances = measure.measure([(slow, "fp32"), (slow, "bf16"), (slow, "int8")], Bundle.load(bundle), 1,
                                       budget_s=2.0, clock=clock)
    assert clock.now - start <= 2.0
    assert set(instances) == {("slow", "fp32"), ("slow", "bf16")}
    assert table[2].images_per_s is None and "budget was spent" in table[2].note
    assert all(row.images_per_s > 0 for row in table[:2])


def test_the_first_candidate_is_timed_even_past_the_budget(bundle):
    """A cheap load but a batch-64 call of 0.64 s, in a budget of 1 s: after the warm calls no
    timed call fits, yet the first candidate times one call of each batch (auto needs a figure to
    choose by: a load never fails for want of time), past the budget by those calls only."""
    clock = FakeClock()
    slow = slow_backend(clock, "slow", 0.05, 0.01)
    start = clock.now
    table, instances = measure.measure([(slow, "fp32")], Bundle.load(bundle), 1, budget_s=1.0, clock=clock)
    assert set(instances) == {("slow", "fp32")} and table[0].images_per_s == pytest.approx(100.0)
    assert clock.now - start <= 1.0 + 0.01 + 0.64


def test_a_later_candidate_whose_timed_calls_do_not_fit_is_closed_not_kept(bundle):
    """A fast first candidate, then one whose batch-64 call (0.64 s) no longer fits after its warm calls."""
    clock = FakeClock()
    fast, slow = slow_backend(clock, "fast", 0.05, 0.0001), slow_backend(clock, "slow", 0.05, 0.01)
    start = clock.now
    table, instances = measure.measure([(fast, "fp32"), (slow, "fp32")], Bundle.load(bundle), 1, budget_s=1.0,
                                       clock=clock)
    assert clock.now - start <= 1.0
    assert set(instances) == {("fast", "fp32")} and slow.closed == ["fp32"]
    assert "not one timed call fitted" in table[1].note
