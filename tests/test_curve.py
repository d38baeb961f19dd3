"""train.curve's budget extrapolation: NLL = a + b ln(step) fitted to validation records."""
from __future__ import annotations

import json
import math

import pytest

from train.curve import log_fit, main, step_reaching


def _records(a: float, b: float, steps) -> list[dict]:
    return [{"step": s, "nll_mean": a + b * math.log(s), "nll_sem": 1.0, "k": 100, "targets": 170} for s in steps]


def test_the_fit_recovers_a_log_linear_curve_and_ignores_steps_outside_its_range():
    records = _records(120.0, -4.0, range(10_000, 60_001, 2_000)) + [{"step": 62_000, "nll_mean": 99.0}]
    a, b, rms, n = log_fit(records, 10_000, 60_000)
    assert (a, b) == pytest.approx((120.0, -4.0), abs=1e-9) and rms < 1e-9 and n == 26
    assert step_reaching(a, b, 120.0 - 4.0 * math.log(1e6)) == pytest.approx(1e6, rel=1e-9)
    assert step_reaching(100.0, 0.5, 90.0) == math.inf, "a rising curve never reaches a lower NLL"


def test_too_few_points_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "losses.csv").write_text("step,stage,kl,con\n")
    (run / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(120.0, -4.0, (1000, 2000))))
    assert main([str(run), "--fit", "1000", "5000"]) == 1
    assert "expected at least 3 validation records in that range, got 2" in capsys.readouterr().err
