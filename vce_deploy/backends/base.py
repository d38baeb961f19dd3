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
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..errors import BackendError, BundleError

if TYPE_CHECKING:
    from ..bundle import Bundle, FileEntry

MODELS = ("encoder", "convertor")
# The I/O contract of the exported graphs (DESIGN.md "Bundle"); the manifest must agree.
MODEL_IO = {
    "encoder": (("x", "q"), ("mu", "logvar")),
    "convertor": (("z", "q"), ("y",)),
}


@dataclass(frozen=True)
class BackendInfo:
    """What `Converter.load` chose, on which device, and why: `conv.backend`."""

    name: str  # registry key: "onnxruntime", "tensorrt", "torch"
    device: str  # "cpu", "cuda:0"
    precision: str  # fp32 | fp16 | int8
    detail: str  # providers, engine files or checkpoint, threads, where noise is drawn
    reason: str  # why this backend (and not the ones before it in the auto order)

    def __str__(self) -> str:
        return f"{self.name} on {self.device} at {self.precision} ({self.detail}); chosen because {self.reason}"


class LatentStream:
    """Standard-normal latents from one Philox stream on the host.

    Consecutive draws continue the stream, so a job cut into chunks (convert_iter, or any
    max_batch) receives exactly the numbers one big draw would have produced.

    Seeding a Philox generator costs more than a batch-1 conversion's whole noise draw, so a
    seeded stream starts from a cached copy of that seed's initial state, in a generator that a
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
    `unavailable`, `__init__` and `run`; GPU backends also override `latent_stream` and
    `convert` to keep noise, inputs and outputs on the device."""

    name: ClassVar[str]
    device_names: ClassVar[str] = r"cpu|cuda(:\d+)?"  # the devices it accepts (a regular expression)
    options: ClassVar[dict[str, tuple]] = {}
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")  # contract.RUN_PRECISIONS it runs  # Converter.load(backend_options=...) keys -> allowed values

    def __init__(self, bundle: "Bundle", precision: str, device: str, threads: int | None):
        self.bundle = bundle
        self.precision = precision
        self.device = device
        self.threads = threads
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
    def default_max_batch(self) -> int:
        return 256  # large enough to keep a CPU busy, small enough to stay in cache-sized chunks

    def describe(self) -> str:
        return f"{self.name} on {self.device}"

    def close(self) -> None:
        """Free device memory; host backends hold nothing that needs it."""

    # -- noise and the batched conversion: host versions, overridden on GPUs -----------------

    def latent_stream(self, seed: int | None) -> LatentStream:
        return LatentStream(seed)

    def run_chunked(self, model: str, inputs: dict[str, np.ndarray], max_batch: int) -> dict[str, np.ndarray]:
        """`run` over batch slices of at most max_batch rows, outputs concatenated in order."""
        total = next(iter(inputs.values())).shape[0]
        if total <= max_batch:
            return self.run(model, inputs)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, total, max_batch):
            parts.append(self.run(model, {k: v[start:start + max_batch] for k, v in inputs.items()}))
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def convert(self, conditions: np.ndarray, samples_per_condition: int, stream: LatentStream,
                temperature: float, max_batch: int) -> np.ndarray:
        """B conditions (B, 1, S, S) -> B * n Bernoulli means (B * n, 1, S, S), condition-major.

        All B * n latents are drawn before the first chunk runs, so the numbers each sample
        gets do not depend on max_batch.
        """
        total = conditions.shape[0] * samples_per_condition
        latents = stream.draw(total, self.latent_dim, temperature)  # (B * n, D)
        if total <= max_batch:  # one engine call: its output is the answer, no copy
            q = conditions if samples_per_condition == 1 else np.repeat(conditions, samples_per_condition, axis=0)
            return self.run("convertor", {"z": latents, "q": q})["y"]
        out = np.empty((total, 1, self.image_size, self.image_size), np.float32)
        for start in range(0, total, max_batch):
            stop = min(start + max_batch, total)
            rows = np.arange(start, stop) // samples_per_condition  # sample i belongs to condition i // n
            out[start:stop] = self.run("convertor", {"z": latents[start:stop], "q": conditions[rows]})["y"]
        return out


def io_contract(image_size: int, latent_dim: int) -> dict[str, tuple]:
    """Every I/O tensor of the two models -> its shape without the batch axis (all float32)."""
    image, latent = (1, image_size, image_size), (latent_dim,)
    return {"x": image, "q": image, "y": image, "z": latent, "mu": latent, "logvar": latent}


def check_entry_io(entry: "FileEntry", role: str, where: str, image_size: int | None = None,
                   latent_dim: int | None = None) -> None:
    """The manifest entry declares the I/O names the runtime relies on and, given the
    manifest's image_size and latent_dim, the shapes and dtypes that follow from them: a
    dynamic batch axis, then exactly those sizes, float32 (fp16 graphs keep float32 I/O)."""
    want_in, want_out = MODEL_IO[role]
    got_in = tuple(t.name for t in entry.inputs)
    got_out = tuple(t.name for t in entry.outputs)
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        raise BundleError(f"{where}: {role} {entry.path} must take inputs {list(want_in)} and give outputs "
                          f"{list(want_out)}; the manifest says inputs {list(got_in)}, outputs {list(got_out)}")
    if image_size is None or latent_dim is None:
        return
    contract = io_contract(image_size, latent_dim)
    problems = []
    for spec in entry.inputs + entry.outputs:
        want = contract[spec.name]
        batch_ok = len(spec.shape) >= 1 and isinstance(spec.shape[0], str)
        if not batch_ok or tuple(spec.shape[1:]) != want:
            problems.append(f"{spec.name!r} shape {list(spec.shape)}, expected ['batch', {', '.join(map(str, want))}]")
        if spec.dtype != "float32":
            problems.append(f"{spec.name!r} dtype {spec.dtype}, expected float32")
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

