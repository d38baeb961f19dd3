"""The backend contract: load once in __init__, then run many times, from any thread.

A backend owns the two models of one bundle precision (encoder, convertor) on one device.
It reads their real input and output names, shapes and dtypes once, checks them against the
manifest, and from then on only runs them. `Converter` talks to every backend through this
class alone, so it never branches on which backend it holds.
"""
from __future__ import annotations

import os
import queue
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from ..contract import BATCH_AXIS, IO_DTYPE, MODEL_IO, tensor_shapes
from ..errors import BackendError, BundleError

if TYPE_CHECKING:
    from ..bundle import Bundle, FileEntry


@dataclass(frozen=True)
class BackendInfo:
    """What `Converter.load` chose, on which device, and why: `converter.backend_info`."""

    name: str  # registry key: "onnxruntime", "tensorrt", "torch"
    device: str  # "cpu", "cuda:0"
    precision: str  # fp32 | fp16 | int8
    detail: str  # providers, engine files or checkpoint, threads, where noise is drawn
    reason: str  # why this backend (and not the ones before it in the auto order)

    def __str__(self) -> str:
        return f"{self.name} on {self.device} at {self.precision} ({self.detail}); chosen because {self.reason}"


class LatentSampler(Protocol):
    """Where `Backend.convert` gets its latents: standard-normal draws on `device` that continue
    one sequence, so a job cut into chunks (convert_iter, or any max_batch) receives exactly
    the numbers one big draw would have produced. Host: HostLatentSampler; a GPU:
    cuda.DeviceLatentSampler."""

    device: str

    def draw(self, count: int, latent_dim: int, temperature: float) -> Any:
        """(count, latent_dim) float32 draws of N(0, temperature^2 I), an array on `device`."""


class HostLatentSampler(LatentSampler):
    """Standard-normal latents from one numpy Philox generator on the host.

    Seeding a Philox generator costs more than a batch-1 conversion's whole noise draw, so a
    seeded sampler starts from a cached copy of that seed's initial state, in a generator that a
    finished call handed back with `release()` (the batch-1 path: docs/cpu_inference.md).
    """

    device = "cpu"
    _initial_states: dict[int, dict] = {}  # seed -> the Philox state its stream starts from
    _spare: "queue.SimpleQueue[np.random.Generator]" = queue.SimpleQueue()  # released generators
    MAX_CACHED_SEEDS = 4096

    def __init__(self, seed: int | None):
        state = self._initial_states.get(seed) if seed is not None else None
        generator = None
        if state is not None:
            try:
                generator = self._spare.get_nowait()
                generator.bit_generator.state = state
            except queue.Empty:
                generator = None
        if generator is None:
            generator = np.random.Generator(np.random.Philox(seed))
            if seed is not None and len(self._initial_states) < self.MAX_CACHED_SEEDS:
                self._initial_states[seed] = generator.bit_generator.state
        self._generator = generator

    def draw(self, count: int, latent_dim: int, temperature: float) -> np.ndarray:
        eps = self._generator.standard_normal((count, latent_dim), dtype=np.float32)  # (count, D)
        return eps if temperature == 1.0 else eps * np.float32(temperature)

    def release(self) -> None:
        """The call is done with this stream: its generator may start another seed's stream."""
        generator, self._generator = self._generator, None
        if generator is not None:
            self._spare.put(generator)


LatentStream = HostLatentSampler  # the old name, kept for callers written before the rename


def physical_cores() -> int:
    """Physical cores of this machine: hyper-threads share one core's conv units, so ONNX
    Runtime runs slower, not faster, with one thread per logical CPU."""
    try:
        import psutil  # optional

        count = psutil.cpu_count(logical=False)
        if count:
            return int(count)
    except ImportError:
        pass
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


class Backend(ABC):
    """One bundle precision, loaded on one device. Subclasses set `name` and implement
    `unavailable`, `__init__` and `run`; GPU backends also override `latent_sampler` and
    `convert` to keep noise, inputs and outputs on the device."""

    name: ClassVar[str]
    device_names: ClassVar[str] = r"cpu|cuda(:\d+)?"  # the devices it accepts (a regular expression)
    options: ClassVar[dict[str, tuple]] = {}  # Converter.load(backend_options=...) keys -> allowed values
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")  # contract.RUN_PRECISIONS it runs

    def __init__(self, bundle: "Bundle | None", precision: str, device: str, threads: int | None):
        self.bundle = bundle  # None for a model given in memory (TorchBackend.from_module)
        self.precision = precision
        self.device = device
        self.threads = threads
        if bundle is not None:
            self.image_size = bundle.manifest.image_size
            self.latent_dim = bundle.manifest.latent_dim

    @classmethod
    @abstractmethod
    def unavailable(cls, bundle: "Bundle", precision: str, device: str | None) -> BackendError | None:
        """The error that says why this backend cannot run this bundle precision here, or None
        if it can. Returned, not raised: "auto" records it as the reason for moving on, an
        explicit choice raises it. Cheap: it never loads a model. `device` None means "the
        best device here"."""

    @classmethod
    def resolve_device(cls, device: str | None) -> str:
        """The concrete device this backend will use for the requested one."""
        return device or "cpu"

    @abstractmethod
    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch through `model` ("encoder" | "convertor"): host arrays in, host arrays out.
        The batch must fit the backend (Converter chunks by max_batch before calling)."""

    @property
    def max_batch_limit(self) -> int | None:
        """The largest batch the backend accepts (an engine's profile), or None for any."""
        return None

    @property
    def min_batch_limit(self) -> int:
        """The smallest batch the backend accepts (an engine profile's min); smaller batches
        are padded up to it by run_padded."""
        return 1

    @property
    def default_max_batch(self) -> int:
        return 256  # large enough to keep a CPU busy, small enough to stay in cache-sized chunks

    def describe(self) -> str:
        return f"{self.name} on {self.device}"

    def close(self) -> None:
        """Free device memory; host backends hold nothing that needs it."""

    # -- noise and the batched conversion: host versions, overridden on GPUs -----------------

    def latent_sampler(self, seed: int | None) -> LatentSampler:
        return HostLatentSampler(seed)

    def run_chunked(self, model: str, inputs: dict[str, np.ndarray], max_batch: int) -> dict[str, np.ndarray]:
        """`run` over batch slices that fit the backend (at most max_batch rows, at least its
        min_batch_limit: a short slice is padded and the padding dropped), outputs in order."""
        total = next(iter(inputs.values())).shape[0]
        if self.min_batch_limit <= total <= max_batch:
            return self.run(model, inputs)
        parts = [self.run_padded(model, {k: v[start:stop] for k, v in inputs.items()})
                 for start, stop in batch_slices(total, max_batch)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def run_padded(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`run` on a batch that may be below the engine profile's minimum: its last row is
        repeated up to the minimum and those rows' outputs are dropped (rows are independent)."""
        rows = next(iter(inputs.values())).shape[0]
        if rows >= self.min_batch_limit:
            return self.run(model, inputs)
        padded = self.run(model, {k: pad_rows(v, self.min_batch_limit) for k, v in inputs.items()})
        return {name: value[:rows] for name, value in padded.items()}

    def convert(self, conditions: np.ndarray, samples_per_condition: int, sampler: LatentSampler,
                temperature: float, max_batch: int) -> np.ndarray:
        """B conditions (B, 1, S, S) -> B * n Bernoulli means (B * n, 1, S, S), condition-major.

        All B * n latents are drawn before the first chunk runs, so the numbers each sample
        gets do not depend on max_batch.
        """
        total = conditions.shape[0] * samples_per_condition
        latents = sampler.draw(total, self.latent_dim, temperature)  # (B * n, D)
        if total <= max_batch:  # one engine call: its output is the answer, no copy
            q = conditions if samples_per_condition == 1 else np.repeat(conditions, samples_per_condition, axis=0)
            return self.run_padded("convertor", {"z": latents, "q": q})["y"]
        out = np.empty((total, 1, self.image_size, self.image_size), np.float32)
        for start, stop in batch_slices(total, max_batch):
            rows = np.arange(start, stop) // samples_per_condition  # sample i belongs to condition i // n
            out[start:stop] = self.run_padded("convertor", {"z": latents[start:stop], "q": conditions[rows]})["y"]
        return out


def batch_slices(total: int, max_batch: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most max_batch rows covering 0..total."""
    return [(start, min(start + max_batch, total)) for start in range(0, total, max_batch)]


def pad_rows(array, rows: int):
    """`array` (numpy or CuPy) with its last row repeated until it has `rows` rows."""
    missing = rows - array.shape[0]
    if missing <= 0:
        return array
    xp = np if isinstance(array, np.ndarray) else __import__("cupy")
    return xp.concatenate([array, xp.repeat(array[-1:], missing, axis=0)])


def check_entry_io(entry: "FileEntry", role: str, where: str, image_size: int | None = None,
                   latent_dim: int | None = None) -> None:
    """The manifest entry declares the I/O names the runtime relies on and, given the
    manifest's image_size and latent_dim, the shapes and dtypes that follow from them: a
    dynamic batch axis, then exactly those sizes, float32 (fp16 graphs keep float32 I/O)."""
    want_in, want_out = MODEL_IO[role].inputs, MODEL_IO[role].outputs
    got_in = tuple(t.name for t in entry.inputs)
    got_out = tuple(t.name for t in entry.outputs)
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        raise BundleError(f"{where}: {role} {entry.path} must take inputs {list(want_in)} and give outputs "
                          f"{list(want_out)}; the manifest says inputs {list(got_in)}, outputs {list(got_out)}")
    if image_size is None or latent_dim is None:
        return
    contract = tensor_shapes(image_size, latent_dim)
    problems = []
    for spec in entry.inputs + entry.outputs:
        want = contract[spec.name]
        batch_ok = len(spec.shape) >= 1 and isinstance(spec.shape[0], str)
        if not batch_ok or tuple(spec.shape[1:]) != want:
            problems.append(f"{spec.name!r} shape {list(spec.shape)}, expected [{BATCH_AXIS!r}, {', '.join(map(str, want))}]")
        if spec.dtype != IO_DTYPE:
            problems.append(f"{spec.name!r} dtype {spec.dtype}, expected {IO_DTYPE}")
    if problems:
        raise BundleError(f"{where}: {role} {entry.path}: the manifest entry does not follow from image_size "
                          f"{image_size} and latent_dim {latent_dim}: " + "; ".join(problems))


def compare_io(entry: "FileEntry", actual_inputs: dict[str, tuple[tuple, str]],
               actual_outputs: dict[str, tuple[tuple, str]], where: str) -> None:
    """Raise one BundleError listing every difference between what the manifest declares and
    what the loaded model really has. Shapes: a string or None on either side is a dynamic
    axis and matches anything; integers must be equal."""
    problems = []
    for kind, declared, actual in (("input", entry.inputs, actual_inputs), ("output", entry.outputs, actual_outputs)):
        declared_names = {t.name for t in declared}
        if declared_names != set(actual):
            problems.append(f"{kind} names: manifest {sorted(declared_names)}, model {sorted(actual)}")
            continue
        for spec in declared:
            shape, dtype = actual[spec.name]
            if spec.dtype != dtype:
                problems.append(f"{kind} {spec.name!r} dtype: manifest {spec.dtype}, model {dtype}")
            static_mismatch = len(spec.shape) != len(shape) or any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(spec.shape, shape))
            if static_mismatch:
                problems.append(f"{kind} {spec.name!r} shape: manifest {list(spec.shape)}, model {list(shape)}")
    if problems:
        raise BundleError(f"{where}: {entry.path} does not match its manifest entry: " + "; ".join(problems))

