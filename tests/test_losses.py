"""The paper's losses against hand-worked values, and where each LMVAE gradient goes."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

import train.train as train_module
from train.config import TrainConfig, validate
from train.losses import PAPER_KL, KLTerm, con, free_bits_kl, hinge, introvae_loss, kl, lmvae_loss, reg, vae_loss
from train.train import apply_gradients, reptile_outer_step
from vce_deploy.model import VCE, ModelConfig


def _logit(p: list[list[float]]) -> torch.Tensor:
    p = torch.tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def test_kl_eq4_by_hand():
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]], dtype=torch.float64)
    # sample 0: 0.5 * [(1 + 1 - 0 - 1) + (0 + 2 - ln 2 - 1)] = 1 - ln(2) / 2
    # sample 1: 0.5 * [(0 + 1 - 0 - 1) + (4 + 1 - 0 - 1)] = 2
    expected = ((1 - math.log(2) / 2) + 2) / 2
    assert kl(mu, logvar).item() == pytest.approx(expected, rel=1e-12)


def test_con_eq5_and_reg_eq10_by_hand():
    logits = _logit([[0.8, 0.25, 0.5, 0.9], [0.5, 0.5, 0.5, 0.5]])
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    # per sample: sum_i -t_i ln y_i - (1 - t_i) ln(1 - y_i); then the batch mean
    con_expected = ((-math.log(0.8) - math.log(0.75) - math.log(0.5) - math.log(0.9)) + 4 * math.log(2)) / 2
    reg_expected = ((-math.log(0.2) - math.log(0.25) - math.log(0.5) - math.log(0.1)) + 4 * math.log(2)) / 2
    assert con(logits, x).item() == pytest.approx(con_expected, rel=1e-12)
    assert reg(logits, q).item() == pytest.approx(reg_expected, rel=1e-12)


def _tiny_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = VCE(ModelConfig(channels=4, blocks=1))
    x = (torch.rand(3, 1, 28, 28) > 0.8).float()
    q = (torch.rand(1, 1, 28, 28) > 0.8).float().expand(3, -1, -1, -1).contiguous()  # one shared condition
    return model, x, q


def _lmvae_by_hand(model, x, q, margin, sigma, lam, noise_seed):
    """Eqs. 11 and 12 written out again, independent of train.losses."""
    def kl_(m, lv):
        return (0.5 * (m ** 2 + lv.exp() - lv - 1).sum(1)).mean()

    def bce(y, t):
        return (-(t * torch.log(y) + (1 - t) * torch.log(1 - y))).flatten(1).sum(1).mean()

    mu, logvar = model.encoder(x, q)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(noise_seed))
    y = model.convertor(mu + torch.exp(0.5 * logvar) * eps, q)  # x_c
    recon = (1 - sigma) * bce(y, x) + sigma * bce(y, q)
    kl_c_critic = kl_(*model.encoder(y.detach(), q))
    l_e = kl_(mu, logvar) + lam * F.relu(margin - kl_c_critic) + recon
    l_c = kl_(mu, logvar) + lam * kl_(*model.encoder(y, q)) + recon
    return l_e, l_c, recon, kl_c_critic


def test_lmvae_step_sends_grad_LE_to_encoder_and_grad_LC_to_convertor():
    margin, sigma, lam = 50.0, 0.15, 0.2
    model, x, q = _tiny_batch()
    enc, conv = list(model.encoder.parameters()), list(model.convertor.parameters())

    l_e, l_c, recon, kl_c = _lmvae_by_hand(model, x, q, margin, sigma, lam, noise_seed=1)
    assert kl_c.item() < margin, "the margin term must be active, or this test checks nothing about it"
    want_enc = torch.autograd.grad(l_e, enc, retain_graph=True)
    want_con = torch.autograd.grad(l_c, conv, retain_graph=True)
    # the margin term sees x_c detached: the convertor's gradient of L_E is that of the reconstruction alone
    want_con_from_le = torch.autograd.grad(recon, conv)

    loss = lmvae_loss(model, x, q, margin, sigma, lam, generator=torch.Generator().manual_seed(1))
    assert loss.encoder.item() == pytest.approx(l_e.item(), rel=1e-5)
    assert loss.convertor.item() == pytest.approx(l_c.item(), rel=1e-5)
    got_con_from_le = torch.autograd.grad(loss.encoder, conv, retain_graph=True)
    for got, want in zip(got_con_from_le, want_con_from_le):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    before = [p.detach().clone() for p in model.parameters()]
    # lr 0: the step leaves the weights alone and the .grad each optimiser saw stays readable
    apply_gradients(model, loss, torch.optim.SGD(enc, lr=0.0), torch.optim.SGD(conv, lr=0.0))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for name, params, wants in (("encoder", enc, want_enc), ("convertor", conv, want_con)):
        for i, (p, want) in enumerate(zip(params, wants)):
            assert p.grad is not None, f"{name} parameter {i} got no gradient"
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} parameter {i}: {m}")


def test_lmvae_step_moves_each_network_by_its_own_gradient():
    """The same, with a real SGD step: the update of each network is -lr times its gradient."""
    margin, sigma, lam, lr = 50.0, 0.15, 0.2, 1e-2
    model, x, q = _tiny_batch(seed=3)
    enc, conv = list(model.encoder.parameters()), list(model.convertor.parameters())
    l_e, l_c, _, _ = _lmvae_by_hand(model, x, q, margin, sigma, lam, noise_seed=2)
    want = torch.autograd.grad(l_e, enc, retain_graph=True) + torch.autograd.grad(l_c, conv)
    before = [p.detach().clone() for p in enc + conv]
    loss = lmvae_loss(model, x, q, margin, sigma, lam, generator=torch.Generator().manual_seed(2))
    apply_gradients(model, loss, torch.optim.SGD(enc, lr=lr), torch.optim.SGD(conv, lr=lr))
    for p, b, g in zip(enc + conv, before, want):
        torch.testing.assert_close(p.detach(), b - lr * g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("epsilon", [0.0, 0.3, 1.0])
def test_reptile_outer_step(epsilon):
    """Algorithm 2, line 10: phi <- phi + epsilon * (phi~ - phi)."""
    model, _, _ = _tiny_batch()
    gen = torch.Generator().manual_seed(5)
    phi = {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}
    phi_tilde = {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(phi_tilde[name])
    reptile_outer_step(model, phi, epsilon)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), phi[name] + epsilon * (phi_tilde[name] - phi[name]),
                                   rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- fidelity to the paper

def _noise(seed: int, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def test_vae_loss_by_hand():
    """L = KL(z) + CON(x, x_c), written out with the same noise."""
    model, x, q = _tiny_batch(seed=4)
    mu, logvar = model.encoder(x, q)
    (eps,) = _noise(7, mu.shape)
    y = model.convertor(mu + torch.exp(0.5 * logvar) * eps, q)
    want = (0.5 * (mu ** 2 + logvar.exp() - logvar - 1).sum(1)).mean() \
        + (-(x * torch.log(y) + (1 - x) * torch.log(1 - y))).flatten(1).sum(1).mean()
    got = vae_loss(model, x, q, torch.Generator().manual_seed(7))
    assert got.encoder is got.convertor, "one objective for both networks"
    assert got.encoder.item() == pytest.approx(want.item(), rel=1e-5)


def test_introvae_loss_eqs_6_and_7_by_hand():
    margin, alpha, beta = 1e4, 0.25, 1.0  # a margin above every KL: both hinges active
    model, x, q = _tiny_batch(seed=5)

    def kl_(m, lv):
        return 0.5 * (m ** 2 + lv.exp() - lv - 1).sum(1)

    mu, logvar = model.encoder(x, q)
    eps, z_s = _noise(8, mu.shape, mu.shape)  # reparameterisation first, then z_s, as the loss draws them
    y = model.convertor(mu + torch.exp(0.5 * logvar) * eps, q)
    x_s = model.convertor(z_s, q)
    l_con = (-(x * torch.log(y) + (1 - x) * torch.log(1 - y))).flatten(1).sum(1).mean()
    critic = sum((margin - kl_(*model.encoder(t.detach(), q))).mean() for t in (y, x_s))
    want_e = kl_(mu, logvar).mean() + alpha * critic + beta * l_con
    want_c = alpha * (kl_(*model.encoder(y, q)).mean() + kl_(*model.encoder(x_s, q)).mean()) + beta * l_con
    got = introvae_loss(model, x, q, margin, alpha, beta, torch.Generator().manual_seed(8))
    assert got.encoder.item() == pytest.approx(want_e.item(), rel=1e-5)
    assert got.convertor.item() == pytest.approx(want_c.item(), rel=1e-5)


def test_hinge_per_sample_against_the_batch_mean_by_hand():
    # KL per sample: 0.5 * mu^2 summed: sample 0 -> 10, sample 1 -> 90; batch mean 50
    mu = torch.tensor([[math.sqrt(20.0), 0.0], [math.sqrt(180.0), 0.0]], dtype=torch.float64)
    logvar = torch.zeros_like(mu)
    assert hinge(50.0, mu, logvar, per_sample=True).item() == pytest.approx((40.0 + 0.0) / 2)
    assert hinge(50.0, mu, logvar, per_sample=False).item() == pytest.approx(0.0, abs=1e-12)


def test_an_inactive_hinge_gives_the_critic_no_gradient():
    """margin 0: max(0, 0 - KL) is 0 for every sample, so L_E's encoder gradient is that of
    KL(z) + the reconstruction alone."""
    model, x, q = _tiny_batch(seed=6)
    enc = list(model.encoder.parameters())
    loss = lmvae_loss(model, x, q, margin=0.0, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(loss.encoder, enc)
    mu, logvar = model.encoder(x, q)
    (eps,) = _noise(3, mu.shape)
    logits = model.convertor.logits(mu + torch.exp(0.5 * logvar) * eps, q)
    without_critic = kl(mu, logvar) + 0.85 * con(logits, x) + 0.15 * reg(logits, q)
    for g, w in zip(got, torch.autograd.grad(without_critic, enc)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_alternating_updates_follow_algorithm_1():
    """Encoder steps on grad L_E; then z_c = Enc(x_c, q) is recomputed with the stepped encoder
    and the convertor steps on grad L_C of that (lines 7-10)."""
    margin, sigma, lam, lr = 50.0, 0.15, 0.2, 5e-2
    model, x, q = _tiny_batch(seed=7)
    reference = copy.deepcopy(model)
    enc, conv = list(model.encoder.parameters()), list(model.convertor.parameters())
    loss = lmvae_loss(model, x, q, margin, sigma, lam, torch.Generator().manual_seed(4), alternating=True)
    apply_gradients(model, loss, torch.optim.SGD(enc, lr=lr), torch.optim.SGD(conv, lr=lr))

    r_enc, r_conv = list(reference.encoder.parameters()), list(reference.convertor.parameters())
    l_e, _, recon, _ = _lmvae_by_hand(reference, x, q, margin, sigma, lam, noise_seed=4)
    mu, logvar = reference.encoder(x, q)
    (eps,) = _noise(4, mu.shape)
    y = reference.convertor(mu + torch.exp(0.5 * logvar) * eps, q)
    grads_e = torch.autograd.grad(l_e, r_enc)
    with torch.no_grad():
        for p, g in zip(r_enc, grads_e):
            p -= lr * g
    kl_c_new = (0.5 * (lambda m, lv: (m ** 2 + lv.exp() - lv - 1).sum(1))(*reference.encoder(y, q))).mean()
    l_c = lam * kl_c_new + (1 - sigma) * con(torch.log(y / (1 - y)), x) + sigma * reg(torch.log(y / (1 - y)), q)
    want_conv = [p - lr * g for p, g in zip(r_conv, torch.autograd.grad(l_c, r_conv))]
    for p, w in zip(enc, r_enc):
        torch.testing.assert_close(p.detach(), w.detach(), rtol=1e-5, atol=1e-7)
    for p, w in zip(conv, want_conv):
        torch.testing.assert_close(p.detach(), w.detach(), rtol=1e-4, atol=1e-6)


def test_learning_rate_schedule_and_stage_boundaries_by_hand():
    config = TrainConfig()  # the paper's numbers: 10k Reptile, 290k VAE, 300k final; halve every 100k
    assert [config.stage(s) for s in (0, 9_999, 10_000, 299_999, 300_000, 599_999)] == \
        ["reptile", "reptile", "vae", "vae", "lmvae", "lmvae"]
    assert config.total_steps == 600_000
    assert [config.lr_at(s) for s in (0, 10_000, 109_999, 110_000, 210_000, 310_000)] == \
        [2e-4, 2e-4, 2e-4, 1e-4, 5e-5, 2.5e-5]


@pytest.mark.parametrize("autocast, native, want", [("auto", True, True), ("auto", False, False),
                                                     ("on", False, True), ("off", True, False)])
def test_bf16_autocast_follows_the_cpu(monkeypatch, autocast, native, want):
    import train.train as train_module

    monkeypatch.setattr(train_module, "has_native_bf16", lambda: native)
    assert train_module.use_bf16(TrainConfig(autocast=autocast)) is want


def test_free_bits_floor_each_dimensions_batch_mean_kl_by_hand():
    # dimension 0: KL 0.5 * mu^2 = 2 and 0 in the two samples (batch mean 1); dimension 1 collapsed (0)
    mu = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    logvar = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    assert free_bits_kl(mu, logvar, 0.25).item() == pytest.approx(1.0 + 0.25)  # the collapsed one costs the floor
    assert free_bits_kl(mu, logvar, 1.5).item() == pytest.approx(1.5 + 1.5)
    free_bits_kl(mu, logvar, 0.25).backward()
    assert mu.grad[:, 1].abs().sum() == 0 and logvar.grad[:, 1].abs().sum() == 0, "below the floor: no push to close"
    assert mu.grad[0, 0].item() == pytest.approx(1.0)  # d/dmu of 0.5 mu^2 / 2 samples


def test_kl_term_defaults_are_eq4_bit_for_bit_and_its_options_change_the_objective():
    model, x, q = _tiny_batch(seed=8)
    mu, logvar = model.encoder(x, q)
    plain = kl(mu, logvar)
    assert PAPER_KL.objective(mu, logvar, plain) is plain
    # the losses: the default objective is the old formula's value bit for bit
    old = (0.5 * (mu ** 2 + logvar.exp() - logvar - 1)).sum(1).mean()  # eq. 4 as it was written before
    assert torch.equal(plain, old)
    base = vae_loss(model, x, q, torch.Generator().manual_seed(1))
    again = vae_loss(model, x, q, torch.Generator().manual_seed(1), kl_term=KLTerm())
    assert torch.equal(base.encoder, again.encoder)
    half = vae_loss(model, x, q, torch.Generator().manual_seed(1), kl_term=KLTerm(weight=0.5))
    assert half.encoder.item() == pytest.approx(base.encoder.item() - 0.5 * base.terms["kl"].item(), rel=1e-6)
    assert torch.equal(half.terms["kl"], base.terms["kl"]), "the logged KL stays eq. 4's"
    for fn in (lmvae_loss, introvae_loss):
        floored = fn(model, x, q, generator=torch.Generator().manual_seed(1), kl_term=KLTerm(free_bits=50.0))
        plain_loss = fn(model, x, q, generator=torch.Generator().manual_seed(1))
        raised = 50.0 * mu.shape[1] - plain_loss.terms["kl"].item()  # every dimension under a 50-nat floor
        assert floored.encoder.item() == pytest.approx(plain_loss.encoder.item() + raised, rel=1e-5)


def test_kl_warmup_ramps_beta_over_the_final_stages_first_steps():
    config = TrainConfig(reptile_steps=2, vae_steps=10, final_steps=20, kl_warmup_steps=8)
    assert [config.kl_weight_at(s) for s in (0, 11, 12, 16, 20, 31)] == [1.0, 1.0, 0.0, 0.5, 1.0, 1.0]
    assert {TrainConfig(reptile_steps=2, vae_steps=10).kl_weight_at(s) for s in (0, 12, 20)} == {1.0}
    loss_at = train_module.final_loss(replace(config, final_loss="vae"))
    model, x, q = _tiny_batch(seed=9)
    at = {s: loss_at(model, x, q, torch.Generator().manual_seed(2), s) for s in (12, 20)}
    assert at[12].encoder.item() == pytest.approx(at[12].terms["con"].item(), rel=1e-6), "step 0 of the stage: no KL"
    assert at[20].encoder.item() == pytest.approx(at[20].terms["con"].item() + at[20].terms["kl"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="free_bits: expected nats per latent dimension >= 0"):
        validate(TrainConfig(free_bits=-1.0))
    with pytest.raises(ValueError, match="kl_warmup_steps: expected a step count >= 0"):
        validate(TrainConfig(kl_warmup_steps=-5))


def test_kl_weight_is_beta_of_the_final_stage_only_and_the_warmup_ends_there():
    heavy = TrainConfig(reptile_steps=2, vae_steps=10, final_steps=20, kl_weight=4.0)
    assert [heavy.kl_weight_at(s) for s in (0, 11, 12, 31)] == [1.0, 1.0, 4.0, 4.0], "stage 2 keeps eq. 2's weight"
    ramped = replace(heavy, kl_warmup_steps=8)
    assert [ramped.kl_weight_at(s) for s in (12, 16, 20, 31)] == [0.0, 2.0, 4.0, 4.0]
    loss_at = train_module.final_loss(replace(heavy, final_loss="vae"))
    model, x, q = _tiny_batch(seed=9)
    loss = loss_at(model, x, q, torch.Generator().manual_seed(2), 12)
    assert loss.encoder.item() == pytest.approx(loss.terms["con"].item() + 4 * loss.terms["kl"].item(), rel=1e-6)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="kl_weight: expected a KL.z. weight > 0"):
            validate(TrainConfig(kl_weight=bad))
