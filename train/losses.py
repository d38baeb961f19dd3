"""The paper's losses. Each is a per-sample sum (over latents or pixels) and a batch mean.

Equation numbers refer to the paper (Li, Han and Xing, "Variational Convertor-Encoder";
docs/design.md, "Losses", restates each one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from vce_deploy.model import VCE, reparameterize


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 activations (autocast) -> float32 for the loss; float64 stays float64."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Eq. 4's summand, one latent dimension each: 0.5 * (mu^2 + sigma^2 - log sigma^2 - 1), (B, D).
    Computed in float32 whatever precision the encoder ran in (bf16 autocast)."""
    mu, logvar = _at_least_fp32(mu), _at_least_fp32(logvar)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Eq. 4: KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1), (B,).
    (The factor 0.5 is a power of two: inside or outside the sum, the bits are the same.)"""
    return kl_per_dimension(mu, logvar).sum(dim=1)


def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Eq. 4, batch mean."""
    return kl_per_sample(mu, logvar).mean()


def free_bits_kl(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Free bits (Kingma et al. 2016, "Improved variational inference with inverse autoregressive
    flow", section on free bits): sum_j max(lambda, E_batch[KL_j]), eq. 4 taken apart per latent
    dimension j, the batch mean first, then floored at lambda nats. A dimension below the floor
    costs lambda and gets no gradient, so the encoder is not pushed to close it."""
    return kl_per_dimension(mu, logvar).mean(0).clamp_min(free_bits).sum()


@dataclass(frozen=True)
class KLTerm:
    """How KL(z) of the posterior (eq. 4) enters a final loss's objective: free bits (a floor in
    nats per latent dimension, 0 = off) and a weight beta (the KL warm-up's, TrainConfig.kl_weight_at).
    The defaults give back eq. 4's batch mean itself, the very tensor: the paper's losses, bit for bit."""

    free_bits: float = 0.0
    weight: float = 1.0

    def objective(self, mu: torch.Tensor, logvar: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
        """beta * KL_free_bits(z); `plain` is kl(mu, logvar), already computed (it is logged as "kl")."""
        value = free_bits_kl(mu, logvar, self.free_bits) if self.free_bits > 0 else plain
        return value if self.weight == 1.0 else self.weight * value


PAPER_KL = KLTerm()


def hinge(margin: float, mu: torch.Tensor, logvar: torch.Tensor, per_sample: bool = True) -> torch.Tensor:
    """max(0, m - KL(z)) of eqs. 6 and 11: per sample, then the batch mean (the paper's form),
    or (per_sample=False) on the batch-mean KL, which goes silent for the whole batch as soon as
    the mean crosses m."""
    if per_sample:
        return F.relu(margin - kl_per_sample(mu, logvar)).mean()
    return F.relu(margin - kl(mu, logvar))


def bce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_i -t_i log y_i - (1 - t_i) log(1 - y_i) with y = sigmoid(logits), batch mean.
    Taking logits keeps it finite where y saturates."""
    return F.binary_cross_entropy_with_logits(_at_least_fp32(logits), target, reduction="none").flatten(1).sum(1).mean()


def con(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eq. 5: the conversion error -log p(x | z, q) under a Bernoulli decoder."""
    return bce_sum(logits, x)


def reg(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Eq. 10: the style regulariser, the same BCE against the condition q."""
    return bce_sum(logits, q)


@dataclass
class LossTerms:
    """What one step computed: `encoder` and `convertor` are the objectives whose gradients
    reach the encoder's and the convertor's parameters; `terms` are logged.

    `convertor_after_encoder_step`, when set, recomputes L_C with the encoder as it is now:
    the training loop calls it after stepping the encoder (Algorithm 1, lines 8-10)."""

    encoder: torch.Tensor
    convertor: torch.Tensor | None  # None: computed by convertor_after_encoder_step
    terms: dict[str, torch.Tensor]  # detached 0-d device tensors: read with device_step.read_terms
    convertor_after_encoder_step: Callable[[], torch.Tensor] | None = None


def vae_loss(model: VCE, x: torch.Tensor, q: torch.Tensor, generator=None, kl_term: KLTerm = PAPER_KL,
             noise: torch.Tensor | None = None) -> LossTerms:
    """Eq. 2 as a loss: L = KL(z) + CON(x, x_c); one objective for both networks.
    kl_term: free bits and the warm-up's beta on KL(z) (KLTerm; the default is eq. 2 as written).
    noise: eps of the reparameterisation drawn beforehand (vce_deploy.model.reparameterize)."""
    mu, logvar = model.encoder(x, q)
    logits = model.convertor.logits(reparameterize(mu, logvar, generator, noise), q)
    l_kl, l_con = kl(mu, logvar), con(logits, x)
    total = kl_term.objective(mu, logvar, l_kl) + l_con
    return LossTerms(total, total, {"kl": l_kl.detach(), "con": l_con.detach(), "loss": total.detach()})


def lmvae_loss(model: VCE, x, q, margin: float = 50.0, sigma: float = 0.15, lam: float = 0.2, generator=None,
               hinge_per_sample: bool = True, alternating: bool = False, kl_term: KLTerm = PAPER_KL) -> LossTerms:
    """Eqs. 11 and 12 (LMVAE with style regularisation), z_c = Enc(x_c, q).

    L_E = KL(z) + lam * max(0, m - KL(z_c)) + (1 - sigma) CON + sigma REG   (eq. 11)
    L_C = KL(z) + lam * KL(z_c)             + (1 - sigma) CON + sigma REG   (eq. 12)
    In L_E the converted x_c is detached before it re-enters the encoder (docs/design.md), so the
    margin term trains the encoder as a critic, not the convertor through it.
    alternating: L_C's KL(z_c) is recomputed by `convertor_after_encoder_step` with the stepped
    encoder (Algorithm 1); otherwise both objectives come from this one forward pass.
    kl_term: free bits and beta on KL(z) alone, the posterior's; KL(z_c) is the critic's and stays.
    """
    mu, logvar = model.encoder(x, q)
    logits = model.convertor.logits(reparameterize(mu, logvar, generator), q)
    x_c = torch.sigmoid(_at_least_fp32(logits))
    l_kl, l_con, l_reg = kl(mu, logvar), con(logits, x), reg(logits, q)
    kl_objective = kl_term.objective(mu, logvar, l_kl)
    recon = (1 - sigma) * l_con + sigma * l_reg
    mu_c, logvar_c = model.encoder(x_c.detach(), q)
    l_e = kl_objective + lam * hinge(margin, mu_c, logvar_c, hinge_per_sample) + recon
    terms = {"kl": l_kl.detach(), "con": l_con.detach(), "reg": l_reg.detach(), "loss_e": l_e.detach()}

    def convertor_objective() -> torch.Tensor:
        kl_c = kl(*model.encoder(x_c, q))
        terms.update(kl_c=kl_c.detach(), loss_c=(kl_objective + lam * kl_c + recon).detach())
        return kl_objective.detach() + lam * kl_c + recon  # KL(z) carries no convertor gradient

    if alternating:
        return LossTerms(l_e, None, terms, convertor_objective)
    return LossTerms(l_e, convertor_objective(), terms)


def introvae_loss(model: VCE, x, q, margin: float = 50.0, alpha: float = 0.25, beta: float = 1.0, generator=None,
                  hinge_per_sample: bool = True, alternating: bool = False, kl_term: KLTerm = PAPER_KL) -> LossTerms:
    """Eqs. 6 and 7 (IntroVAE adapted to the VCE), the paper's ablation.

    x_c = Con(z, q) with z ~ q(z | x, q); x_s = Con(z_s, q) with z_s ~ N(0, I).
    L_E = KL(z) + alpha * sum_{j=c,s} max(0, m - KL(z_j)) + beta CON   (eq. 6, x_j detached)
    L_C = alpha * sum_{j=c,s} KL(z_j) + beta CON                         (eq. 7)
    kl_term: free bits and the warm-up's weight on KL(z) of eq. 6 (not on the critic's KL(z_j)).
    """
    mu, logvar = model.encoder(x, q)
    logits = model.convertor.logits(reparameterize(mu, logvar, generator), q)
    z_s = torch.randn(mu.shape, generator=generator, dtype=torch.float32, device=mu.device)
    x_c, x_s = torch.sigmoid(_at_least_fp32(logits)), _at_least_fp32(model.convertor(z_s, q))
    l_kl, l_con = kl(mu, logvar), con(logits, x)
    critic = sum(hinge(margin, *model.encoder(x_j.detach(), q), hinge_per_sample) for x_j in (x_c, x_s))
    l_e = kl_term.objective(mu, logvar, l_kl) + alpha * critic + beta * l_con
    terms = {"kl": l_kl.detach(), "con": l_con.detach(), "loss_e": l_e.detach()}

    def convertor_objective() -> torch.Tensor:
        kl_c, kl_s = kl(*model.encoder(x_c, q)), kl(*model.encoder(x_s, q))
        l_c = alpha * (kl_c + kl_s) + beta * l_con
        terms.update(kl_c=kl_c.detach(), kl_s=kl_s.detach(), loss_c=l_c.detach())
        return l_c

    if alternating:
        return LossTerms(l_e, None, terms, convertor_objective)
    return LossTerms(l_e, convertor_objective(), terms)


LOSSES = {"vae": vae_loss, "lmvae": lmvae_loss, "introvae": introvae_loss}
