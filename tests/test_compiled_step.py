"""The whole training step (train/compiled_step.py) and the device-resident episodes
(train/data.py DeviceEpisodes): the same numbers as the eager path. torch.compile runs here on
the CPU (inductor, about 30 s for the smoke model on one thread); the CUDA choices are checked
with stand-ins only: not run on a GPU."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from train.compiled_step import WholeStep, draw_noise, make_capturable, options
from train.data import DRAWINGS_PER_CHARACTER, DeviceEpisodes, sample_episodes
from train.losses import vae_loss
from train.train import apply_gradients
from vce_deploy.model import VCE, ModelConfig
from vce_deploy.omniglot import Split
from test_train import cached_data, splits  # noqa: F401  (fixtures)

SMOKE = ModelConfig(channels=8, blocks=1)
CPU = torch.device("cpu")


def sample_episodes_before(split, count, rng):
    """sample_episodes as it was until session 7: the stream every existing checkpoint resumes."""
    chars = rng.choice(len(split), size=count, replace=count > len(split))
    xs, qs = [], []
    for c in chars:
        order = rng.permutation(DRAWINGS_PER_CHARACTER)
        xs.append(split.images[c, order[1:]])
        qs.append(np.broadcast_to(split.images[c, order[0]], xs[-1].shape))
    return np.ascontiguousarray(np.concatenate(xs)[:, None]), np.ascontiguousarray(np.concatenate(qs)[:, None])


def toy_split(characters=7):
    images = np.random.default_rng(1).random((characters, DRAWINGS_PER_CHARACTER, 28, 28)).astype(np.float32)
    return Split(images, [("a", str(i)) for i in range(characters)])


@pytest.mark.parametrize("count", [1, 3, 9])  # 9 > 7 characters: drawn with replacement
def test_episodes_are_the_stream_existing_checkpoints_resume(count):
    split = toy_split()
    for seed in range(4):
        old = sample_episodes_before(split, count, np.random.default_rng([seed, 5]))
        new = sample_episodes(split, count, np.random.default_rng([seed, 5]))
        on_device = DeviceEpisodes(split, CPU).sample(count, np.random.default_rng([seed, 5]))
        for a, b, c in zip(old, new, on_device):
            assert b.dtype == np.float32 and b.shape == (count * 19, 1, 28, 28)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c.numpy())


def test_device_episodes_draw_as_many_numbers_as_the_host_path():
    split = toy_split()
    host, device = np.random.default_rng(3), np.random.default_rng(3)
    sample_episodes(split, 4, host)
    DeviceEpisodes(split, CPU).sample(4, device)
    assert host.random() == device.random()  # the next draw (jitter, the next step) is unchanged


def test_cuda_gets_cuda_graphs_and_capturable_adam_the_cpu_neither():
    assert options(torch.device("cuda", 0)) == {"mode": "reduce-overhead", "capturable": True}
    assert options(CPU) == {"mode": "default", "capturable": False}


def test_whole_step_on_a_stand_in_cuda_device_is_compiled_for_cuda_graphs(monkeypatch):
    """No CUDA here: tensors are made on the CPU, the device object says cuda, torch.compile records."""
    requested = {}
    model = VCE(SMOKE)
    opts = [torch.optim.Adam(model.encoder.parameters(), 1e-3), torch.optim.Adam(model.convertor.parameters(), 1e-3)]
    real_tensor, real_zeros = torch.tensor, torch.zeros
    monkeypatch.setattr(torch, "tensor", lambda value, device=None, **kw: real_tensor(value, **kw))
    monkeypatch.setattr(torch, "zeros", lambda *shape, device=None, **kw: real_zeros(*shape, **kw))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: requested.update(kw) or fn)
    WholeStep(model, *opts, batch=19, device=torch.device("cuda", 0))
    assert requested["mode"] == "reduce-overhead"
    assert all(g["capturable"] and g["fused"] is None and isinstance(g["lr"], torch.Tensor)
               for opt in opts for g in opt.param_groups)


def test_a_resumed_adams_step_counters_go_where_capturable_wants_them(monkeypatch):
    import train.compiled_step as compiled_step

    model = VCE(SMOKE)
    opt = torch.optim.Adam(model.encoder.parameters(), 1e-3)
    vae_loss(model, torch.zeros(19, 1, 28, 28), torch.zeros(19, 1, 28, 28)).encoder.backward()
    opt.step()
    monkeypatch.setattr(compiled_step, "options", lambda device: {"mode": "reduce-overhead", "capturable": True})
    make_capturable(opt, CPU)  # the CPU stands in for the GPU: the counters become float32 device tensors
    steps = [state["step"] for state in opt.state.values()]
    assert steps and all(isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.item() == 1 for s in steps)
    assert opt.param_groups[0]["capturable"] and opt.param_groups[0]["lr"].item() == pytest.approx(1e-3)


def run(model, steps, lr, compiled, eager_reference=False):
    opt_enc = torch.optim.Adam(model.encoder.parameters(), lr)
    opt_con = torch.optim.Adam(model.convertor.parameters(), lr)
    step = None if eager_reference else WholeStep(model, opt_enc, opt_con, 19, CPU, compile=compiled)
    split, terms = toy_split(), []
    for s in range(steps):
        x, q = (torch.from_numpy(a) for a in sample_episodes(split, 1, np.random.default_rng([0, s])))
        x = (x > 0.5).float()
        if eager_reference:  # what train.train does without the option
            loss = vae_loss(model, x, q, torch.Generator().manual_seed(s))
            apply_gradients(model, loss, opt_enc, opt_con)
            terms.append(loss.terms["loss"].item())
        else:
            noise = draw_noise(19, model.config.latent_dim, torch.Generator().manual_seed(s), CPU)
            terms.append(step(x, q, noise, lr)[2].item())
    return torch.cat([p.detach().flatten() for p in model.parameters()]), terms


def test_the_uncompiled_whole_step_is_the_eager_training_step():
    torch.manual_seed(0)
    start = VCE(SMOKE)
    ref, ref_terms = run(copy.deepcopy(start), 5, 1e-3, compiled=False, eager_reference=True)
    got, got_terms = run(copy.deepcopy(start), 5, 1e-3, compiled=False)
    np.testing.assert_allclose(got_terms, ref_terms, rtol=1e-6)
    assert (got - ref).abs().max() < 1e-6


# torch.compile of forward, backward and Adam: about 30 s on one thread, the slowest test here
def test_the_compiled_whole_step_gives_the_eager_parameters_and_would_see_a_wrong_lr():
    torch.manual_seed(0)
    start = VCE(SMOKE)
    ref, ref_terms = run(copy.deepcopy(start), 6, 1e-3, compiled=False, eager_reference=True)
    wrong, _ = run(copy.deepcopy(start), 6, 1.1e-3, compiled=False, eager_reference=True)
    got, got_terms = run(copy.deepcopy(start), 6, 1e-3, compiled=True)
    np.testing.assert_allclose(got_terms, ref_terms, rtol=1e-5)
    # Adam divides by sqrt(v): a rounding difference in a near-zero gradient moves a weight by up
    # to about lr per step, so the bound is a fraction of lr * steps, well below a 10% lr error's
    tolerance = 0.02 * 1e-3 * 6
    print("compiled vs eager", float((got - ref).abs().max()), "wrong lr vs eager", float((wrong - ref).abs().max()))
    assert (got - ref).abs().max() < tolerance
    assert (wrong - ref).abs().max() > 3 * tolerance  # the check can tell a 10% lr error apart


def test_a_batch_of_another_shape_is_refused():
    model = VCE(SMOKE)
    step = WholeStep(model, torch.optim.Adam(model.encoder.parameters()), torch.optim.Adam(model.convertor.parameters()),
                     19, CPU, compile=False)
    with pytest.raises(ValueError, match=r"built for a batch of shape \(19, 1, 28, 28\), got \(38, 1, 28, 28\)"):
        step(torch.zeros(38, 1, 28, 28), torch.zeros(38, 1, 28, 28), torch.zeros(38, 56), 1e-3)


def test_a_run_with_the_compiled_step_is_the_eager_run_within_rounding(tmp_path, cached_data):  # noqa: F811
    from test_train import CHECKPOINT, _log_rows, _weights, tiny
    from train.train import train

    train(tiny(), tmp_path / "eager", progress=False)
    train(tiny(compiled_step=True), tmp_path / "compiled", progress=False)  # 4 VAE steps through the whole step
    eager, compiled = _weights(tmp_path / "eager" / CHECKPOINT), _weights(tmp_path / "compiled" / CHECKPOINT)
    assert eager.keys() == compiled.keys()
    worst = max(float((eager[k].float() - compiled[k].float()).abs().max()) for k in eager if k.startswith("model."))
    assert 0 < worst < 0.02 * tiny().lr * 9, worst  # not the same code path, the same numbers (see the bound above)
    rows_e, rows_c = _log_rows(tmp_path / "eager" / "losses.csv"), _log_rows(tmp_path / "compiled" / "losses.csv")
    assert [r["step"] for r in rows_e] == [r["step"] for r in rows_c]
    np.testing.assert_allclose([float(r["loss"] or r["loss_c"]) for r in rows_c],
                               [float(r["loss"] or r["loss_c"]) for r in rows_e], rtol=1e-3)


def test_train_gpu_script_asked_for_the_compiled_step_trains_with_it_in_its_dry_mode(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vce_deploy.checkpoint import read_meta

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, VCE_TRAIN_GPU_DRY="1", COMPILED_STEP="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(root / "scripts" / "train_gpu.sh"), str(tmp_path / "gpu")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    meta = read_meta(tmp_path / "gpu" / "checkpoint.safetensors")
    assert meta["step"] == 36 and meta["train_config"]["compiled_step"] is True
