"""The paper's losses against hand-worked values, and where each LMVAE gradient goes."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from train.losses import con, kl, lmvae_loss, reg
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
