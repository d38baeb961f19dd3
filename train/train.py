"""The whole training loop: Reptile pre-training, the VAE stage, then the final loss.

Phases of one step, top to bottom: learning rate, the step itself (a Reptile outer
iteration, or one Adam step of each network on its own objective), log, samples,
checkpoint. Every random draw of step s comes from (seed, s), so a resumed run continues
exactly where it stopped.
"""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vce_deploy.checkpoint import atomic_write_bytes, load_tensors, read_meta, save_checkpoint, sidecar_path
from vce_deploy.errors import CheckpointError
from vce_deploy.grid import save_grid
from vce_deploy.model import VCE

from vce_deploy.cpu import has_native_bf16
from vce_deploy.omniglot import Split, load_split, nll_targets

from . import compiled_step, device_step
from .config import TrainConfig, resume_mismatches, validate
from .data import DeviceEpisodes, jitter_drawings, rotated_classes, sample_episodes
from .losses import LOSSES, KLTerm, LossTerms, vae_loss

LOG_COLUMNS = ("step", "stage", "lr", "seconds", "loss", "loss_e", "loss_c", "kl", "con", "reg", "kl_c", "kl_s")
CHECKPOINT = "checkpoint.safetensors"
STAGE2_CHECKPOINT = "stage2.safetensors"
SAMPLE_CONDITIONS = 8
SAMPLES_PER_CONDITION = 10


def step_rngs(seed: int, step: int, device: str = "cpu") -> tuple[np.random.Generator, torch.Generator]:
    return np.random.default_rng([seed, step]), torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def use_bf16(config: TrainConfig) -> bool:
    """bf16 autocast where it runs natively (docs/training.md has the measured speed-ups)."""
    if config.autocast != "auto":
        return config.autocast == "on"
    if config.device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return has_native_bf16()


def validation_nll(model: VCE, x: np.ndarray, q: np.ndarray, k: int, seed: int, channels_last: bool) -> dict:
    """The one-shot NLL on the validation characters: the number every choice is made on."""
    from vce_deploy import Converter
    from vce_deploy.nll import one_shot_nll

    was_training = model.training
    try:
        result = one_shot_nll(Converter.from_torch(model, channels_last=channels_last), x, q, k=k, seed=seed)
    finally:
        model.train(was_training)
    return {key: result[key] for key in ("nll_mean", "nll_sem", "elbo_mean", "k", "targets")}


def reptile_outer_step(model: torch.nn.Module, phi: dict[str, torch.Tensor], epsilon: float) -> None:
    """Algorithm 2, line 10: phi <- phi + epsilon * (phi~ - phi), phi~ being the weights now."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(phi[name] + epsilon * (param - phi[name]))


def apply_gradients(model: VCE, loss: LossTerms, opt_enc, opt_con) -> None:
    """The encoder steps on grad L_E, the convertor on grad L_C (docs/design.md, "Losses").

    With `loss.convertor_after_encoder_step` (Algorithm 1's alternating updates) the encoder
    steps first and L_C is then computed with the stepped encoder."""
    enc, conv = list(model.encoder.parameters()), list(model.convertor.parameters())
    opt_enc.zero_grad(set_to_none=True)
    opt_con.zero_grad(set_to_none=True)
    if loss.encoder is loss.convertor:  # one objective (VAE): one backward pass
        loss.encoder.backward()
        opt_enc.step()
        opt_con.step()
        return
    for p, g in zip(enc, torch.autograd.grad(loss.encoder, enc, retain_graph=True)):
        p.grad = g
    if loss.convertor_after_encoder_step is not None:
        opt_enc.step()
        convertor_objective = loss.convertor_after_encoder_step()
    else:
        convertor_objective = loss.convertor
    for p, g in zip(conv, torch.autograd.grad(convertor_objective, conv, allow_unused=True)):
        p.grad = g
    if loss.convertor_after_encoder_step is None:
        opt_enc.step()
    opt_con.step()


def final_loss(config: TrainConfig):
    """-> loss(model, x, q, generator, step): the final stage's loss with the config's weights, and
    its KL(z) term at that step (free bits, the warm-up's beta: train/losses.py KLTerm)."""
    fn = LOSSES[config.final_loss]
    switches = {"hinge_per_sample": config.hinge_per_sample, "alternating": config.alternating}

    def kl_term(step: int) -> KLTerm:
        return KLTerm(config.free_bits, config.kl_weight_at(step))

    if config.final_loss == "lmvae":
        return lambda m, x, q, g, s: fn(m, x, q, config.margin, config.sigma, config.lam, g, **switches,
                                        kl_term=kl_term(s))
    if config.final_loss == "introvae":
        return lambda m, x, q, g, s: fn(m, x, q, config.margin, config.intro_alpha, config.intro_beta, g, **switches,
                                        kl_term=kl_term(s))
    return lambda m, x, q, g, s: fn(m, x, q, g, kl_term=kl_term(s))


def sample_grid(model: VCE, test: Split, seed: int) -> np.ndarray:
    """Fig. 4 layout: one row per test-alphabet condition, the condition first, then samples."""
    rows = np.linspace(0, len(test) - 1, SAMPLE_CONDITIONS).astype(int)
    q = torch.from_numpy(test.images[rows, 0][:, None])  # (8, 1, 28, 28)
    q_rep = q.repeat_interleave(SAMPLES_PER_CONDITION, 0)
    z = torch.randn(len(q_rep), model.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    with torch.no_grad():
        y = model.convertor(z.to(device), q_rep.to(device)).float().cpu()
    y = y.reshape(SAMPLE_CONDITIONS, SAMPLES_PER_CONDITION, 28, 28)
    return np.concatenate([q.numpy()[:, :1], y.numpy()], axis=1)


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{index}.{key}"] = torch.as_tensor(value)
    return out


def _load_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    body = optimizer.state_dict()
    body["state"] = state
    optimizer.load_state_dict(body)


def _save(out: Path, model, optimizers, config: TrainConfig, step: int, metrics: dict,
          name: str = CHECKPOINT, branched_from: dict | None = None) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for opt_name, opt in optimizers.items():  # not `name`: that is the file name
        tensors.update(_optimizer_tensors(f"optim.{opt_name}", opt))
    meta = {"model_config": config.model.to_dict(), "train_config": config.to_dict(), "step": step,
            "stage": config.stage(step - 1) if step else "init", "seed": config.seed, "metrics": metrics}
    if branched_from:  # provenance of a branched run (train.train.branch), kept at every save
        meta["branched_from"] = branched_from
    save_checkpoint(out / name, tensors, meta)


def branch(source: Path, run_dir: Path, config: TrainConfig) -> None:
    """Start a new run in `run_dir` from the state (weights and optimiser) of checkpoint `source`,
    with `config` as its recipe from the source's step on: the copied sidecar records the new
    config and where it branched, so resuming the branch checks against the branch's recipe.
    For equal-budget comparisons (train.table1, train.ablate): every row from one state."""
    meta = read_meta(source)
    if meta["model_config"] != config.model.to_dict():
        raise CheckpointError(f"{source}: cannot branch, its model config {meta['model_config']} differs from "
                              f"the branch's {config.model.to_dict()}")
    meta = {**meta, "train_config": config.to_dict(),
            "branched_from": {"path": str(source), "step": meta["step"], "train_config": meta.get("train_config")}}
    run_dir.mkdir(parents=True, exist_ok=True)
    # weights first, sidecar last: a checkpoint without its sidecar is incomplete (vce_deploy.checkpoint)
    atomic_write_bytes(run_dir / CHECKPOINT, Path(source).read_bytes())
    atomic_write_bytes(sidecar_path(run_dir / CHECKPOINT), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def _resume(out: Path, model, optimizers, config: TrainConfig) -> tuple[int, dict | None]:
    """-> (the step to go on from, the run's branched_from record if it is a branch)."""
    path = out / CHECKPOINT
    if not path.exists():
        if config.init_from:  # weights only: a new run that starts where another model stands
            tensors = load_tensors(config.init_from)
            model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        return 0, None
    meta = read_meta(path)
    if meta["model_config"] != config.model.to_dict():
        raise CheckpointError(
            f"{path}: cannot resume, its model config {meta['model_config']} differs from the requested "
            f"{config.model.to_dict()}; use another --out or the same model flags"
        )
    differ = resume_mismatches(meta.get("train_config", {}), config)
    if differ:  # a resumed run must continue the same recipe, or it is not one run
        listed = "; ".join(f"{name}: checkpoint {saved!r}, requested {asked!r}" for name, (saved, asked) in differ.items())
        raise CheckpointError(f"{path}: cannot resume, the training config differs from the checkpoint's ({listed}); "
                              f"pass the checkpoint's values, or use another --out")
    tensors = load_tensors(path)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, opt in optimizers.items():
        _load_optimizer(f"optim.{name}", opt, tensors)
    return int(meta["step"]), meta.get("branched_from")


def _open_log(out: Path, resumed_step: int):
    path = out / "losses.csv"
    kept = []
    if resumed_step and path.exists():  # drop rows logged after the checkpoint we resume from
        with open(path, newline="") as handle:
            kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resumed_step]
    handle = open(path, "w", newline="")
    writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(kept)
    return handle, writer


def train(config: TrainConfig, out: str | os.PathLike, data_dir=None, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 2)))
    torch.manual_seed(config.seed)  # weight init
    device = torch.device(config.device)
    validate(config)
    train_split = load_split(config.split, "train", data_dir, validation_alphabets=config.held_out_alphabets)
    valid_split = load_split(config.split, "validation", data_dir, validation_alphabets=config.held_out_alphabets)
    if "rot90" in config.augmentations:
        train_split = rotated_classes(train_split)
    jitter = "jitter" in config.augmentations
    valid_x, valid_q = nll_targets(valid_split)
    model = VCE(config.model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    model.to(device)  # before the optimisers: fused Adam needs its parameters on the GPU
    device_step.prepare(device)
    optimizers = {
        "encoder": device_step.adam(model.encoder.parameters(), device, lr=config.lr),
        "convertor": device_step.adam(model.convertor.parameters(), device, lr=config.lr),
        "reptile": device_step.adam(model.parameters(), device, lr=config.reptile_inner_lr, betas=(0.0, 0.999)),
    }
    start, branched_from = _resume(out, model, optimizers, config)
    for opt in optimizers.values():  # resumed optimiser state follows the parameters' device
        for state in opt.state.values():
            for key, value in state.items():
                state[key] = value.to(device) if key != "step" else value
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(config))
    # on a GPU the images live there, copied once (the host path's draws: the same episodes)
    on_device = DeviceEpisodes(train_split, device, memory_format) if device.type == "cuda" and not jitter else None
    whole_step = None  # built after the resume: it makes the (resumed) optimisers capturable
    if config.compiled_step:
        whole_step = compiled_step.WholeStep(model, optimizers["encoder"], optimizers["convertor"],
                                             19 * config.episodes_per_step, device, memory_format, use_bf16(config))
    log_handle, log = _open_log(out, start)
    step_fn = final_loss(config)
    recent: list[float] = []
    t0 = last_save = time.perf_counter()

    def batch(episodes: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
        if on_device is not None:
            return on_device.sample(episodes, rng)
        x, q = sample_episodes(train_split, episodes, rng)
        if jitter:
            x = jitter_drawings(x, rng)
        return tuple(torch.from_numpy(a).to(device, memory_format=memory_format) for a in (x, q))

    def save(step: int, name: str = CHECKPOINT, extra: dict | None = None) -> None:
        _save(out, model, optimizers, config, step, {"train_loss_recent_mean": device_step.mean(recent), **(extra or {})},
              name=name, branched_from=branched_from)

    bar = tqdm(range(start, config.total_steps), initial=start, total=config.total_steps,
               disable=not progress, desc="train", dynamic_ncols=True)
    done = start
    for step in bar:
        rng, gen = step_rngs(config.seed, step, device.type)
        stage = config.stage(step)
        lr = config.lr_at(step)
        for name in ("encoder", "convertor"):
            compiled_step.set_lr(optimizers[name], lr)
        # the step
        with autocast:
            if stage == "reptile":
                phi = {k: v.detach().clone() for k, v in model.named_parameters()}
                x, q = batch(1, rng)
                for _ in range(config.reptile_inner_steps):
                    loss = vae_loss(model, x, q, gen)
                    optimizers["reptile"].zero_grad(set_to_none=True)
                    loss.encoder.backward()
                    optimizers["reptile"].step()
                reptile_outer_step(model, phi, config.reptile_epsilon)
                terms = loss.terms
            else:
                x, q = batch(config.episodes_per_step, rng)
                # by step, not by stage name: a final stage with the VAE loss is also called "vae", and its
                # KL options (free bits, warm-up) live in step_fn only
                final = step >= config.final_stage_start
                if whole_step is not None and not final:
                    noise = compiled_step.draw_noise(len(x), config.model.latent_dim, gen, device)
                    terms = whole_step.terms(whole_step(x, q, noise, lr))
                else:
                    loss = step_fn(model, x, q, gen, step) if final else vae_loss(model, x, q, gen)
                    apply_gradients(model, loss, optimizers["encoder"], optimizers["convertor"])
                    terms = loss.terms
        # log
        headline = terms.get("loss", terms.get("loss_c"))  # a device tensor: no sync here
        recent = (recent + [headline])[-100:]
        if step % config.log_every == 0 or step == config.total_steps - 1:
            logged = device_step.read_terms(terms)  # the one host read of the step's terms
            log.writerow({"step": step + 1, "stage": stage, "lr": lr, "seconds": round(time.perf_counter() - t0, 2),
                          **{k: round(v, 4) for k, v in logged.items()}})
            log_handle.flush()
            bar.set_postfix(stage=stage, **{k: f"{v:.1f}" for k, v in logged.items() if k in ("kl", "con", "kl_c")})
        done = step + 1
        # samples, validation and checkpoint
        if done % config.sample_every == 0 or done == config.total_steps:
            save_grid(sample_grid(model, valid_split, config.seed), out / "samples" / f"step_{done:07d}.png")
        if config.validate_every and done % config.validate_every == 0:
            record = {"step": done, "seconds": round(time.perf_counter() - t0, 1), **validation_nll(
                model, valid_x, valid_q, config.validate_k, config.seed, config.channels_last)}
            with open(out / "validation.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            bar.write(f"step {done}: validation NLL {record['nll_mean']:.2f} ± {record['nll_sem']:.2f} "
                      f"(K={record['k']}, {record['targets']} targets)")
        now = time.perf_counter()
        out_of_time = config.time_limit_s and now - t0 >= config.time_limit_s
        save_due = config.checkpoint_every_s and now - last_save >= config.checkpoint_every_s
        if done % config.checkpoint_every == 0 or done == config.total_steps or out_of_time or save_due:
            save(done)
            last_save = now
        if done == config.final_stage_start:  # branch point for other final losses (train.table1)
            save(done, name=STAGE2_CHECKPOINT)
        if out_of_time:
            break
    log_handle.close()
    bar.close()
    return {"steps": done, "of": config.total_steps, "resumed_from": start, "seconds": time.perf_counter() - t0,
            "train_loss_recent_mean": device_step.mean(recent) if recent else None}
