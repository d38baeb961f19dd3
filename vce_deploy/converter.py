"""`Converter`: the runtime applications embed (docs/design.md "Runtime API").

    converter = Converter.load("bundle/")               # verified bundle, best backend here
    y = converter.convert(images, n=16, seed=0)         # (B, 16, 28, 28) float32 Bernoulli means
    mu, logvar = converter.encode(x, q)                 # the rules that turn q into x
    y = converter.transfer(x, q, targets, n=4, seed=0)  # those rules applied to other glyphs

The backend is chosen once in `load`; every method after that goes through the same
`Backend` interface. A Converter keeps no per-call state, so one instance is safe to share
between threads, and an error in one call leaves it ready for the next.
"""
from __future__ import annotations

import itertools
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .backends import BACKENDS, Backend, BackendInfo, HostLatentSampler, LatentSampler, auto
from .backends.measure import measuring_enabled, pick
from .bundle import Bundle
from .contract import RUN_PRECISIONS
from .cpu import this_cpu
from .errors import BundleError, DependencyError, InputError
from .grid import WRAP_CELLS, save_grid
from .inputs import (DEFAULT_N, DEFAULT_TEMPERATURE, glyph_items, positive_int, preprocess_batch, raw_batch,
                     seed_value, temperature_value)
from .preprocess import IMAGE_SIZE

DEVICE = re.compile(r"cpu|cuda(:\d+)?|GPU(\.\d+)?|NPU")  # GPU / NPU: OpenVINO's names for Intel devices
# convert() and transfer() return one array; past this many bytes they refuse and point to
# convert_iter, which holds at most max_batch samples at a time. Per instance: converter.max_output_bytes.
MAX_OUTPUT_BYTES = 1 << 30


def _backend_options(chosen: type[Backend], options: Any) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InputError(f"backend_options: expected None or a dict, got {type(options).__name__}")
    for key, value in options.items():
        if key not in chosen.options:
            raise InputError(f"backend_options: {chosen.name} takes {sorted(chosen.options)}, got {key!r}")
        if value not in chosen.options[key]:
            raise InputError(f"backend_options[{key!r}]: expected one of {list(chosen.options[key])}, got {value!r}")
    return dict(options)


class Converter:
    """One bundle precision on one backend. Build it with `Converter.load`."""

    def __init__(self, bundle: Bundle | None, backend: Backend, info: BackendInfo, max_batch: int):
        self._bundle = bundle
        self._backend = backend
        self._info = info
        self._max_batch = max_batch
        self.max_output_bytes = MAX_OUTPUT_BYTES  # the largest array convert / transfer return

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, backend: str = "auto", precision: str = "fp32",
             device: str | None = None, max_batch: int | None = None, threads: int | None = None,
             backend_options: dict | None = None, *,
             allow_unsealed: bool = False, trusted_keys: Any = None, device_built: Any = (),
             measure: bool | None = None) -> "Converter":
        """Verify the bundle at `path` (None: the shipped default) and load one backend.

        backend: "auto" (a TensorRT engine built for this GPU, else ONNX Runtime on its GPU
        providers, else the CPU order of backends/auto.py), or one of BACKENDS by name.
        precision: one of contract.RUN_PRECISIONS (bf16: the fp32 graph computed in bfloat16),
        or "auto" with backend="auto": on a CPU, the (backend, precision) measured fastest here
        among those whose NLL cost in the manifest is at most 0.5 nats (backends/measure.py:
        timed at the first load, at most about 2 s, then cached); `conv.backend_info.reason`
        has the measured table and the choice.
        device: None (the backend's best), "cpu", "cuda" or "cuda:N" ("GPU", "GPU.N", "NPU":
        OpenVINO's Intel devices, not run here).
        max_batch: rows per engine call (default: the engine profile's max, or 256).
        threads: intra-op threads (default: physical cores).
        backend_options: the chosen backend's own settings (its `options`, e.g. openvino's
        performance_hint).
        allow_unsealed, trusted_keys, device_built: see Bundle.load and docs/signing.md; with
        trusted_keys an unsigned or wrongly signed bundle is refused before anything is parsed.
        measure: with precision="auto", False skips measuring (the CPU-flag table decides);
        None: measure unless VCE_AUTO_MEASURE=0.
        """
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InputError(f"path: expected None, a str or os.PathLike bundle directory, got {type(path).__name__}")
        names = ("auto", *BACKENDS)
        if not isinstance(backend, str) or backend not in names:
            raise InputError(f"backend: expected one of {list(names)}, got {backend!r}")
        if not isinstance(precision, str) or precision not in ("auto", *RUN_PRECISIONS):
            raise InputError(f"precision: expected one of {['auto', *RUN_PRECISIONS]}, got {precision!r}")
        if device is not None and not (isinstance(device, str) and DEVICE.fullmatch(device)):
            raise InputError(f"device: expected None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if max_batch is not None:
            max_batch = positive_int(max_batch, "max_batch")
        if threads is not None:
            threads = positive_int(threads, "threads")
        bundle = Bundle.load(path, verify=False, allow_unsealed=allow_unsealed, trusted_keys=trusted_keys,
                             device_built=device_built)
        bundle.check_present()  # the files the backend loads are hashed as it reads them (read_verified)
        if bundle.manifest.image_size != IMAGE_SIZE:
            raise BundleError(f"{bundle.path}: expected image_size {IMAGE_SIZE} (what preprocess makes), "
                              f"the manifest says {bundle.manifest.image_size}")
        asked = precision
        chosen, precision, reason = auto.choose(BACKENDS, bundle, backend, precision, device)
        options = _backend_options(chosen, backend_options)
        resolved = chosen.resolve_device(device)
        instance = None
        if asked == "auto" and resolved == "cpu" and not options and measuring_enabled(measure):
            candidates, _ = auto.cpu_candidates(BACKENDS, bundle, this_cpu())
            chosen, precision, reason, instance, _ = pick(candidates, bundle, threads)
        if instance is None:
            instance = chosen(bundle, precision, resolved, threads, **options)
        limit = instance.max_batch_limit
        if max_batch is None:
            max_batch = instance.default_max_batch
        elif (limit is not None and max_batch > limit) or max_batch < instance.min_batch_limit:
            low = instance.min_batch_limit
            instance.close()
            raise InputError(f"max_batch: expected {low}..{limit if limit is not None else 'any'} (the engine's batch "
                             f"profile), got {max_batch}")
        info = BackendInfo(chosen.name, resolved, precision, instance.describe(), reason)
        return cls(bundle, instance, info, max_batch)

    @classmethod
    def from_torch(cls, model, channels_last: bool | None = None, max_batch: int | None = None) -> "Converter":
        """A PyTorch VCE already in memory behind the same API, its weights used in place (not
        copied), on the device they are on: the NLL of a model while it trains, or of a
        checkpoint without exporting it. channels_last: see TorchBackend.from_module."""
        from .backends.torch import TorchBackend

        backend = TorchBackend.from_module(model, channels_last)
        max_batch = positive_int(max_batch, "max_batch") if max_batch is not None else backend.default_max_batch
        info = BackendInfo(backend.name, backend.device, "fp32", backend.describe(), "a PyTorch model was given")
        return cls(None, backend, info, max_batch)

    # -- what was loaded ---------------------------------------------------------------------

    @property
    def backend_info(self) -> BackendInfo:
        """Which backend, device and precision were chosen, and why."""
        return self._info

    @property
    def backend(self) -> Backend:
        """The loaded backend itself: `backend.run(model, inputs)` is one bare engine call on a
        ready batch (no preprocessing, noise or chunking), for benchmarks and profilers."""
        return self._backend

    @property
    def engine(self) -> Backend:
        """Deprecated name of `backend`."""
        warnings.warn("Converter.engine is deprecated: use Converter.backend (and Converter.backend_info for "
                      "what was chosen and why)", DeprecationWarning, stacklevel=2)
        return self._backend

    @property
    def bundle(self) -> Bundle | None:
        """The bundle loaded, or None for a model given in memory (`from_torch`)."""
        return self._bundle

    @property
    def precision(self) -> str:
        return self._info.precision

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def latent_dim(self) -> int:
        return self._backend.latent_dim

    @property
    def image_size(self) -> int:
        return self._backend.image_size

    def __repr__(self) -> str:
        source = str(self._bundle.path) if self._bundle is not None else "a model in memory"
        return f"Converter({source!r}, {self._info.name} on {self._info.device}, {self.precision})"

    def close(self) -> None:
        """Release device memory (TensorRT buffers); CPU backends hold none."""
        self._backend.close()

    def __enter__(self) -> "Converter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the glyph API ----------------------------------------------------------------------

    def convert(self, images: Any, n: int = DEFAULT_N, seed: int | None = None,
                temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
        """n new variations of every glyph in `images` -> (B, n, 28, 28) float32 Bernoulli means.

        images: a path, PIL image or array (H, W) / (H, W, 3 or 4) / (B, H, W) / (B, 1, H, W) /
        (B, H, W, 3 or 4), or a list of them (vce_deploy/inputs.py). n: default DEFAULT_N (16),
        the same as `vce convert`. temperature: default DEFAULT_TEMPERATURE (0.7; 1.0 samples the
        prior itself). All B * n latents are drawn at once from N(0, temperature^2 I), so a seed
        gives the same output on the same backend whatever max_batch is. seed None: fresh noise.
        """
        n = positive_int(n, "n")
        seed, temperature = seed_value(seed), temperature_value(temperature)
        self._check_output("convert", 1, n)  # before opening any file: n alone may be too much
        conditions = preprocess_batch(images, "images")  # (B, 1, 28, 28)
        self._check_output("convert", conditions.shape[0], n)
        sampler = self._backend.latent_sampler(seed)
        try:
            return self._convert(conditions, n, sampler, temperature)
        finally:
            getattr(sampler, "release", lambda: None)()  # a host sampler's generator is reused

    def _check_output(self, method: str, glyphs: int, n: int) -> None:
        """Refuse a call whose one returned array would pass max_output_bytes."""
        size = self.image_size
        need = glyphs * n * (size * size + self.latent_dim) * 4  # float32 output and latents
        if need > self.max_output_bytes:
            if method == "convert":
                advice = (f"stream it with convert_iter(images, n, seed), which holds at most max_batch = "
                          f"{self._max_batch} samples at a time")
            else:  # no streaming transfer: the job splits into independent calls
                advice = ("split it into several transfer() calls over slices of targets or with a smaller n, "
                          "each with its own seed")
            raise InputError(
                f"n: expected {method}() to fit in max_output_bytes = {self.max_output_bytes} bytes, got {glyphs} "
                f"{_plural(glyphs, 'glyph')} x n = {n} samples = {need} bytes of float32 output and latents; "
                f"{advice} (or raise converter.max_output_bytes)")

    def convert_iter(self, images: Any, n: int = DEFAULT_N, seed: int | None = None,
                     temperature: float = DEFAULT_TEMPERATURE,
                     conditions_per_chunk: int | None = None, progress: bool = False) -> Iterator[np.ndarray]:
        """`convert` for jobs too large to hold at once, in memory bounded by max_batch, not by n
        or the number of images: images are preprocessed only when their chunk is reached.

        n <= max_batch: yields (b, n, 28, 28), b whole conditions per chunk (default
        max_batch // n), so `np.concatenate(chunks)` equals `convert(images, n, seed)`.
        n > max_batch: yields each condition's samples in slices (1, m, 28, 28), m <= max_batch,
        in order. In both cases the chunks draw consecutively from one noise stream, so
        `np.concatenate([c.reshape(-1, 28, 28) for c in chunks]).reshape(B, n, 28, 28)`
        equals `convert(images, n, seed)`.
        progress: show a tqdm bar (tqdm, a dependency of vce-deploy; DependencyError without it).
        """
        n = positive_int(n, "n")
        seed, temperature = seed_value(seed), temperature_value(temperature)
        per_chunk = (positive_int(conditions_per_chunk, "conditions_per_chunk") if conditions_per_chunk is not None
                     else max(1, self._max_batch // n))
        items, total = glyph_items(images, "images")
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError as err:  # not the caller's input: a package missing from this environment
                raise DependencyError("progress=True draws a progress bar with tqdm, which is not installed "
                                      "here: pip install tqdm (or call convert_iter without progress)") from err
            bar = tqdm(total=total, unit="glyph", desc="convert")
        return self._convert_chunks(items, n, seed, temperature, per_chunk, bar)

    def _convert_chunks(self, items, n, seed, temperature, per_chunk, bar) -> Iterator[np.ndarray]:
        sampler = self._backend.latent_sampler(seed)
        start = 0
        try:
            while True:
                chunk = list(itertools.islice(items, per_chunk))
                if not chunk:
                    if start == 0:
                        raise InputError("images: expected at least one image, got an empty batch")
                    return
                conditions = preprocess_batch(chunk, f"images[{start}:{start + len(chunk)}]")
                if n <= self._max_batch:
                    yield self._convert(conditions, n, sampler, temperature)
                else:  # one condition's samples do not fit one engine batch: slice them
                    for row in range(conditions.shape[0]):
                        for done in range(0, n, self._max_batch):
                            count = min(self._max_batch, n - done)
                            yield self._convert(conditions[row:row + 1], count, sampler, temperature)
                start += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()

    def _convert(self, conditions: np.ndarray, n: int, sampler: LatentSampler, temperature: float) -> np.ndarray:
        batch, size = conditions.shape[0], self.image_size
        y = self._backend.convert(conditions, n, sampler, temperature, self._max_batch)  # (B * n, 1, S, S)
        return y.reshape(batch, n, size, size)

    def encode(self, x: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
        """The posterior of the rules that turn each condition q[i] into the target x[i]:
        (mu, logvar), each (B, latent_dim). x and q are images, as for `convert`."""
        targets, conditions = self._pairs(x, q)
        return self._encode(targets, conditions)

    def transfer(self, x: Any, q: Any, targets: Any, n: int = 1, seed: int | None = None,
                 temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
        """Apply the rules that turn q into x to other glyphs -> (T, n, 28, 28).

        z ~ N(mu, temperature^2 sigma^2) from Enc(x, q), then Con(z, target). One (x, q)
        pair applies to every target; P pairs apply pairwise to P targets.
        """
        n = positive_int(n, "n")
        seed, temperature = seed_value(seed), temperature_value(temperature)
        self._check_output("transfer", 1, n)
        examples, conditions = self._pairs(x, q)
        glyphs = preprocess_batch(targets, "targets")  # (T, 1, 28, 28)
        pairs, count = examples.shape[0], glyphs.shape[0]
        self._check_output("transfer", count, n)
        if pairs not in (1, count):
            raise InputError(f"transfer: expected one (x, q) pair or one per target ({count}), got {pairs} pairs")
        mu, logvar = self._encode(examples, conditions)  # (P, D) each
        rows = np.arange(count * n) // n  # sample i belongs to target i // n
        rule = rows if pairs == count else np.zeros_like(rows)
        eps = HostLatentSampler(seed).draw(count * n, self.latent_dim, temperature)  # host: mu lives here
        z = mu[rule] + np.exp(0.5 * logvar[rule]) * eps  # (T * n, D)
        y = self._backend.run_chunked("convertor", {"z": z.astype(np.float32), "q": glyphs[rows]}, self._max_batch)["y"]
        return y.reshape(count, n, self.image_size, self.image_size)

    def _pairs(self, x: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
        targets, conditions = preprocess_batch(x, "x"), preprocess_batch(q, "q")
        if targets.shape[0] != conditions.shape[0]:
            raise InputError(f"x and q: expected the same number of glyphs (one condition per target), "
                             f"got {targets.shape[0]} and {conditions.shape[0]}")
        return targets, conditions

    def _encode(self, x: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._backend.run_chunked("encoder", {"x": x, "q": q}, self._max_batch)
        return out["mu"], out["logvar"]

    # -- raw arrays: the evaluator and the benchmark ---------------------------------------

    def run_encoder(self, x: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed float32 (B, 1, 28, 28) targets and conditions -> (mu, logvar), (B, D) each,
        in chunks of max_batch."""
        shape = (1, self.image_size, self.image_size)
        x, q = raw_batch(x, "x", shape), raw_batch(q, "q", shape)
        if x.shape[0] != q.shape[0]:
            raise InputError(f"x and q: expected the same batch size, got {x.shape[0]} and {q.shape[0]}")
        return self._encode(x, q)

    def run_convertor(self, z: np.ndarray, q: np.ndarray) -> np.ndarray:
        """float32 latents (B, D) and preprocessed conditions (B, 1, 28, 28) -> y (B, 1, 28, 28),
        in chunks of max_batch."""
        z = raw_batch(z, "z", (self.latent_dim,))
        q = raw_batch(q, "q", (1, self.image_size, self.image_size))
        if z.shape[0] != q.shape[0]:
            raise InputError(f"z and q: expected the same batch size, got {z.shape[0]} and {q.shape[0]}")
        return self._backend.run_chunked("convertor", {"z": z, "q": q}, self._max_batch)["y"]


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else f"{noun}s"


def conversion_grid(conditions: Any, samples: np.ndarray) -> np.ndarray:
    """Conditions in the first column, their samples beside them -> (B, 1 + n, S, S).
    `conditions` are the images as given to `convert` (preprocessed here the same way; a
    second preprocessing of an already binarized glyph is not guaranteed to be a no-op)."""
    conditions = preprocess_batch(conditions, "conditions")[:, 0]  # (B, S, S)
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 4 or samples.shape[0] != conditions.shape[0] or samples.shape[2:] != conditions.shape[1:]:
        raise InputError(f"samples: expected ({conditions.shape[0]}, n, {conditions.shape[1]}, "
                         f"{conditions.shape[2]}) to match the conditions, got shape {samples.shape}")
    return np.concatenate([conditions[:, None], samples], axis=1)


def save_conversions(path: str | os.PathLike, samples: np.ndarray, conditions: Any = None, scale: int = 2,
                     wrap: int | None = WRAP_CELLS) -> Path:
    """Write `convert`'s output as one grid image (a row per condition, wrapped every `wrap`
    cells; format from the extension: .png, .jpg, ...); with `conditions`, each row starts
    with its condition."""
    grid = samples if conditions is None else conversion_grid(conditions, samples)
    return save_grid(grid, path, scale=scale, wrap=wrap)
