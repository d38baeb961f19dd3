"""The paper's losses. Each is a per-sample sum (over latents or pixels) and a batch mean.

Equation numbers refer to ../shared/paper/vce-paper.txt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from vce_deploy.model import VCE, reparameterize


def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Eq. 4: KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=1).mean()


def bce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_i -t_i log y_i - (1 - t_i) log(1 - y_i) with y = sigmoid(logits), batch mean.
    Taking logits keeps it finite where y saturates."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1).mean()


def con(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eq. 5: the conversion error -log p(x | z, q) under a Bernoulli decoder."""
    return bce_sum(logits, x)


def reg(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Eq. 10: the style regulariser, the same BCE against the condition q."""
    return bce_sum(logits, q)


@dataclass
class LossTerms:
    """What one step computed: `encoder` and `convertor` are the objectives whose gradients
    reach the encoder's and the convertor's parameters; `terms` are logged."""

    encoder: torch.Tensor
    convertor: torch.Tensor
    terms: dict[str, float]


def vae_loss(model: VCE, x: torch.Tensor, q: torch.Tensor, generator=None) -> LossTerms:
    """Eq. 2 as a loss: L = KL(z) + CON(x, x_c); one objective for both networks."""
    mu, logvar = model.encoder(x, q)
    logits = model.convertor.logits(reparameterize(mu, logvar, generator), q)
    l_kl, l_con = kl(mu, logvar), con(logits, x)
    total = l_kl + l_con
    return LossTerms(total, total, {"kl": l_kl.item(), "con": l_con.item(), "loss": total.item()})


def lmvae_loss(model: VCE, x, q, margin: float = 50.0, sigma: float = 0.15, lam: float = 0.2, generator=None) -> LossTerms:
    """Eqs. 11 and 12 (LMVAE with style regularisation), z_c = Enc(x_c, q).

    L_E = KL(z) + lam * max(0, m - KL(z_c)) + (1 - sigma) CON + sigma REG   (eq. 11)
    L_C = KL(z) + lam * KL(z_c)             + (1 - sigma) CON + sigma REG   (eq. 12)
    In L_E the converted x_c is detached before it re-enters the encoder (DESIGN.md), so the
    margin term trains the encoder as a critic, not the convertor through it.
    """
    mu, logvar = model.encoder(x, q)
    logits = model.convertor.logits(reparameterize(mu, logvar, generator), q)
    x_c = torch.sigmoid(logits)
    l_kl, l_con, l_reg = kl(mu, logvar), con(logits, x), reg(logits, q)
    recon = (1 - sigma) * l_con + sigma * l_reg
    kl_c_critic = kl(*model.encoder(x_c.detach(), q))
    kl_c = kl(*model.encoder(x_c, q))
    l_e = l_kl + lam * F.relu(margin - kl_c_critic) + recon
    l_c = l_kl + lam * kl_c + recon
    terms = {"kl": l_kl.item(), "con": l_con.item(), "reg": l_reg.item(), "kl_c": kl_c.item(),
             "loss_e": l_e.item(), "loss_c": l_c.item()}
    return LossTerms(l_e, l_c, terms)


def introvae_loss(model: VCE, x, q, margin: float = 50.0, alpha: float = 0.25, beta: float = 1.0, generator=None) -> LossTerms:
    """Eqs. 6 and 7 (IntroVAE adapted to the VCE), the paper's ablation.

    x_c = Con(z, q) with z ~ q(z | x, q); x_s = Con(z_s, q) with z_s ~ N(0, I).
    L_E = KL(z) + alpha * sum_{j=c,s} max(0, m - KL(z_j)) + beta CON   (eq. 6, x_j detached)
    L_C = alpha * sum_{j=c,s} KL(z_j) + beta CON                         (eq. 7)
    """
    mu, logvar = model.encoder(x, q)
    logits = model.convertor.logits(reparameterize(mu, logvar, generator), q)
    z_s = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    x_c, x_s = torch.sigmoid(logits), model.convertor(z_s, q)
    l_kl, l_con = kl(mu, logvar), con(logits, x)
    critic = sum(F.relu(margin - kl(*model.encoder(x_j.detach(), q))) for x_j in (x_c, x_s))
    kl_c, kl_s = kl(*model.encoder(x_c, q)), kl(*model.encoder(x_s, q))
    l_e = l_kl + alpha * critic + beta * l_con
    l_c = alpha * (kl_c + kl_s) + beta * l_con
    terms = {"kl": l_kl.item(), "con": l_con.item(), "kl_c": kl_c.item(), "kl_s": kl_s.item(),
             "loss_e": l_e.item(), "loss_c": l_c.item()}
    return LossTerms(l_e, l_c, terms)


LOSSES = {"vae": vae_loss, "lmvae": lmvae_loss, "introvae": introvae_loss}
