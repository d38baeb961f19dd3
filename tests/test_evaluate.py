"""The importance-sampled NLL against a model whose marginal likelihood is known exactly.

The analytic model. Pixel j of the last 56 (the "active" pixels) is tied to latent z_j:
    y_j(z) = ALPHA * exp(-BETA * (z_j - m_j)^2),  m_j = 0.8 * (2 q_j - 1)  (q's first 56 pixels),
and every target has x_j = 1 there. Then N(z_j; 0, 1) * y_j(z_j) is a scaled Gaussian in z_j:
    p(x_j = 1 | q) = ALPHA / sqrt(1 + 2 BETA) * exp(-BETA m_j^2 / (1 + 2 BETA)),
    posterior     = N(2 BETA m_j / (1 + 2 BETA), 1 / (1 + 2 BETA)).
The other 728 pixels ignore z: y_i = 0.2 + 0.6 q_i. So log p(x | q) is a closed form, and an
encoder that returns the exact posterior makes every importance weight equal p(x | q).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from train.evaluate import PROB_CLAMP, TorchModel, main, one_shot_nll

ALPHA, BETA, D, M = 0.9, 0.25, 56, 784
ACTIVE = slice(M - D, M)


def _m(q: np.ndarray) -> np.ndarray:
    return 0.8 * (2.0 * q.reshape(len(q), -1)[:, :D].astype(np.float64) - 1.0)  # (B, D)


class AnalyticModel:
    def __init__(self, shift: float = 0.0, widen: float = 0.0):
        self.shift, self.widen = shift, widen  # 0, 0: the proposal is the exact posterior

    def run_encoder(self, x, q):
        m = _m(q)
        mu = 2 * BETA * m / (1 + 2 * BETA) + self.shift
        logvar = np.full_like(mu, -math.log(1 + 2 * BETA) + self.widen)
        return mu, logvar

    def run_convertor(self, z, q):
        flat = q.reshape(len(q), -1).astype(np.float64)
        y = 0.2 + 0.6 * flat  # float64 on purpose: the exact test should not measure float32 rounding
        y[:, ACTIVE] = ALPHA * np.exp(-BETA * (z.astype(np.float64) - _m(q)) ** 2)
        return y.reshape(q.shape)


def exact_log_px(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    xf, qf = x.reshape(len(x), -1).astype(np.float64), q.reshape(len(q), -1).astype(np.float64)
    y = 0.2 + 0.6 * qf[:, : M - D]
    passive = (xf[:, : M - D] * np.log(y) + (1 - xf[:, : M - D]) * np.log(1 - y)).sum(1)
    m = _m(q)
    active = (math.log(ALPHA) - 0.5 * math.log(1 + 2 * BETA) - BETA * m ** 2 / (1 + 2 * BETA)).sum(1)
    return passive + active


def _targets(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 1, 28, 28)) > 0.7).astype(np.float32)
    x.reshape(n, -1)[:, ACTIVE] = 1.0  # the closed form needs x = 1 on the active pixels
    q = (rng.random((n, 1, 28, 28)) > 0.5).astype(np.float32)  # a different condition per target
    return x, q


@pytest.mark.parametrize("k, batch_size", [(1, 1000), (7, 20), (7, 3), (50, 1000)])
def test_exact_posterior_gives_the_exact_nll_for_any_k(k, batch_size):
    """Several targets per convertor batch (batch_size > k) and one target split over batches
    (batch_size < k) must both pair every z with its own target and condition."""
    x, q = _targets(6)
    result = one_shot_nll(AnalyticModel(), x, q, k=k, batch_size=batch_size)
    exact = -exact_log_px(x, q)
    np.testing.assert_allclose(result["nll_per_target"], exact, rtol=0, atol=1e-6)
    assert result["nll_mean"] == pytest.approx(exact.mean(), abs=1e-6)
    assert result["nll_sem"] == pytest.approx(exact.std(ddof=1) / math.sqrt(6), abs=1e-6)
    # with the exact posterior every log-weight is log p(x|q), so the ELBO is tight too
    assert result["elbo_mean"] == pytest.approx(exact.mean(), abs=1e-6)
    assert (result["k"], result["targets"]) == (k, 6)


def test_a_worse_proposal_converges_as_k_grows():
    x, q = _targets(8, seed=1)
    exact = -exact_log_px(x, q).mean()
    model = AnalyticModel(shift=0.15, widen=0.3)  # off-centre and too wide: weights vary
    errors = {}
    for k in (1, 10, 100, 1000):
        result = one_shot_nll(model, x, q, k=k, seed=3, batch_size=4000)
        errors[k] = result["nll_mean"] - exact
        # log-mean-exp <= mean-log (Jensen), sample by sample: -ELBO >= NLL estimate
        assert result["elbo_mean"] >= result["nll_mean"] - 1e-9
    assert errors[1] > 1.0, f"the proposal should be bad enough to matter at K=1, errors {errors}"
    assert abs(errors[1000]) < abs(errors[10]) / 4 < abs(errors[1]) / 4, f"error did not shrink with K: {errors}"
    assert abs(errors[1000]) < 0.1, f"K=1000 should be within 0.1 nats of the exact NLL, errors {errors}"


def test_same_seed_same_result_any_batch_and_subset():
    x, q = _targets(5, seed=2)
    model = AnalyticModel(shift=0.25, widen=0.4)
    a = one_shot_nll(model, x, q, k=30, seed=4, batch_size=1000)
    b = one_shot_nll(model, x, q, k=30, seed=4, batch_size=7)
    first = one_shot_nll(model, x[:2], q[:2], k=30, seed=4)
    other_seed = one_shot_nll(model, x, q, k=30, seed=5)
    np.testing.assert_allclose(a["nll_per_target"], b["nll_per_target"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(a["nll_per_target"][:2], first["nll_per_target"], rtol=0, atol=1e-9)
    assert a["nll_mean"] != other_seed["nll_mean"]


def test_saturated_probabilities_are_clamped_not_infinite():
    """y of exactly 0 where x = 1 costs -log(1e-7) nats, not infinity."""
    class Saturated:
        def run_encoder(self, x, q):
            return np.zeros((len(x), D), np.float32), np.zeros((len(x), D), np.float32)  # = the prior

        def run_convertor(self, z, q):
            y = np.full((len(z), 1, 28, 28), 0.5, np.float32)
            y[:, 0, 0, 0], y[:, 0, 0, 1] = 0.0, 1.0
            return y

    x = np.zeros((2, 1, 28, 28), np.float32)
    x[:, 0, 0, 0] = x[:, 0, 0, 1] = 1.0
    result = one_shot_nll(Saturated(), x, x.copy(), k=5)
    expected = -math.log(PROB_CLAMP) - math.log1p(-PROB_CLAMP) + (M - 2) * math.log(2)
    assert result["nll_mean"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad, message", [
    (lambda x, q: (x[:, 0], q[:, 0]), "expected x of shape (N, 1, H, W)"),
    (lambda x, q: (x, q[:2]), "same shape"),
    (lambda x, q: (x[:0], q[:0]), "at least one target"),
])
def test_bad_inputs_are_named(bad, message):
    x, q = _targets(3)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        one_shot_nll(AnalyticModel(), *bad(x, q), k=2)


def test_torch_model_matches_the_network(smoke_checkpoint):
    import torch

    from vce_deploy.checkpoint import load_model

    vce, _ = load_model(smoke_checkpoint)
    model = TorchModel(vce)
    x, q = _targets(3)
    z = np.random.default_rng(0).standard_normal((3, vce.config.latent_dim)).astype(np.float32)
    mu, logvar = model.run_encoder(x, q)
    y = model.run_convertor(z, q)
    with torch.no_grad():
        want_mu, want_logvar = vce.encoder(torch.from_numpy(x), torch.from_numpy(q))
        want_y = vce.convertor(torch.from_numpy(z), torch.from_numpy(q))
    assert mu.shape == (3, vce.config.latent_dim) and y.shape == (3, 1, 28, 28) and y.dtype == np.float32
    np.testing.assert_allclose(mu, want_mu.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logvar, want_logvar.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, want_y.numpy(), rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in vce.parameters())


def test_cli_on_the_smoke_checkpoint(smoke_checkpoint, tmp_path, capsys):
    out = tmp_path / "nll.json"
    assert main([str(smoke_checkpoint), "--k", "8", "--limit", "4", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["targets"] == 4 and record["k"] == 8 and len(record["nll_per_target"]) == 4
    assert f"{record['nll_mean']:.2f} ± {record['nll_sem']:.2f}" in printed
    # a Bernoulli model over 784 pixels: between 0 and 784 * log(1 / 1e-7) nats
    assert 0 < record["nll_mean"] <= record["elbo_mean"] < 784 * -math.log(PROB_CLAMP)


def test_cli_refuses_what_it_cannot_evaluate(tmp_path, capsys):
    assert main([str(tmp_path / "model.pt"), "--k", "2"]) == 1
    assert "expected a .safetensors checkpoint or a bundle directory" in capsys.readouterr().err


def test_a_bundle_is_evaluated_through_the_runtime(smoke_bundle, smoke_checkpoint, tmp_path, capsys):
    """The same estimator on the exported fp32 ONNX model gives the PyTorch model's NLL."""
    from vce_deploy.omniglot import load_split, nll_targets

    x, q = nll_targets(load_split("small", "test"))
    x, q = x[:6], q[:6]
    torch_nll = one_shot_nll(TorchModel.from_checkpoint(smoke_checkpoint), x, q, k=8, seed=1)
    out = tmp_path / "bundle.json"
    assert main([str(smoke_bundle), "--backend", "onnxruntime", "--precision", "fp32", "--k", "8", "--seed", "1",
                 "--limit", "6", "--split", "small", "--json", str(out), "--no-progress"]) == 0
    assert "backend=onnxruntime" in capsys.readouterr().out
    record = json.loads(out.read_text())
    bundle_nll = np.asarray(record["nll_per_target"])
    np.testing.assert_allclose(bundle_nll, torch_nll["nll_per_target"], rtol=0, atol=0.05)
