"""Golden outputs: a bundle verifies itself on the device it runs on, without torch.

The exporter (export/golden.py) stores golden.npz in the bundle, hashed like every file:
real glyph pairs from the test alphabets (x, q), fixed prior noise z, and the eager PyTorch
fp32 outputs on them (mu, logvar from the encoder, y from the convertor). `vce verify` runs
every precision on every backend usable here (ONNX Runtime on the CPU, its GPU providers,
every TensorRT engine built for this GPU) on those inputs and compares with the one tolerance
table (vce_deploy/tolerances.py). int8 is judged on real glyphs, the inputs it was calibrated
for, as one fixed batch. What cannot run here is reported as skipped with the reason.

The file is read from the hashed bytes with allow_pickle=False: nothing is unpickled.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .bundle import Bundle
from .contract import MODEL_IO, tensor_shapes
from .errors import BackendError, BundleError
from .tolerances import TOLERANCES

GOLDEN_FILE = "golden.npz"
INPUTS = ("x", "q", "z")
OUTPUTS = tuple(name for io_ in MODEL_IO.values() for name in io_.outputs)  # mu, logvar, y


@dataclass(frozen=True)
class Golden:
    arrays: dict[str, np.ndarray]  # x, q, z inputs; mu, logvar, y eager-PyTorch fp32 outputs

    @property
    def count(self) -> int:
        return self.arrays["x"].shape[0]


def load_golden(bundle: Bundle) -> Golden | None:
    """The bundle's golden set, checked against the I/O contract; None if it has none."""
    found = bundle.entries("golden")
    if not found:
        return None
    entry = found[0]
    where = f"{bundle.path}/{entry.path}"
    data = bundle.read_verified(entry)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise BundleError(f"{where}: expected an .npz of plain float32 arrays, got an unreadable file ({err})") from err
    shapes = tensor_shapes(bundle.manifest.image_size, bundle.manifest.latent_dim)
    want = set(INPUTS + OUTPUTS)
    if set(arrays) != want:
        raise BundleError(f"{where}: expected arrays {sorted(want)}, got {sorted(arrays)}")
    count = arrays["x"].shape[0] if arrays["x"].ndim else 0
    for name, array in arrays.items():
        if array.dtype != np.float32 or array.shape != (count, *shapes[name]) or count < 1:
            raise BundleError(f"{where}: expected {name!r} float32 of shape ({count or 'N >= 1'}, "
                              f"{', '.join(map(str, shapes[name]))}), got {array.dtype} {array.shape}")
        if not np.isfinite(array).all():
            raise BundleError(f"{where}: expected finite values in {name!r}, got NaN or inf")
    return Golden(arrays)


@dataclass
class GoldenResult:
    backend: str  # "onnxruntime", "tensorrt"
    device: str
    precision: str
    status: str  # "ok" | "FAILED" | "skipped"
    reason: str = ""  # why skipped or failed
    max_error: dict[str, float] = field(default_factory=dict)  # output -> max |got - golden|

    def line(self) -> str:
        where = f"golden {self.precision} {self.backend} on {self.device}"
        if self.status == "skipped":
            return f"{where}: skipped ({self.reason})"
        tolerance = TOLERANCES[self.precision]
        errors = ", ".join(f"{name} {value:.2e}" for name, value in self.max_error.items())
        limit = f"tolerance {tolerance.atol:g} + {tolerance.rtol:g}*|golden|"
        tail = f": {self.reason}" if self.reason else ""
        return f"{where}: max |got - golden| {errors} ({limit}): {self.status}{tail}"


def compare(precision: str, got: dict[str, np.ndarray], golden: Golden) -> tuple[bool, dict[str, float], str]:
    """Every output within TOLERANCES[precision] of the golden one, elementwise."""
    tolerance = TOLERANCES[precision]
    errors, worst = {}, []
    for name in OUTPUTS:
        reference = golden.arrays[name]
        diff = np.abs(got[name].reshape(reference.shape) - reference)
        errors[name] = float(diff.max())
        outside = int(np.count_nonzero(diff > tolerance.allowed(reference)))
        if outside:
            worst.append(f"{name}: {outside} of {diff.size} values outside")
    return not worst, errors, "; ".join(worst)


def run_golden(converter, golden: Golden) -> dict[str, np.ndarray]:
    a = golden.arrays
    mu, logvar = converter.run_encoder(a["x"], a["q"])
    return {"mu": mu, "logvar": logvar, "y": converter.run_convertor(a["z"], a["q"])}


def _targets(bundle: Bundle) -> list[tuple[str, str | None, str]]:
    """(backend, device, precision) for every precision of the bundle on every runtime backend:
    ONNX Runtime on the CPU always, on its GPU providers and TensorRT where they are usable."""
    from .backends import BACKENDS

    precisions = sorted({e.precision for e in bundle.entries(format="onnx")},
                        key=lambda p: list(TOLERANCES).index(p))
    targets = []
    for precision in precisions:
        targets.append(("onnxruntime", "cpu", precision))
        gpu = BACKENDS["onnxruntime"].resolve_device(None)
        if gpu.startswith("cuda"):
            targets.append(("onnxruntime", gpu, precision))
        targets.append(("tensorrt", None, precision))
    return targets


def verify_golden(bundle: Bundle, golden: Golden, allow_unsealed: bool = False) -> list[GoldenResult]:
    """Run every (backend, device, precision) this machine can run on the golden inputs
    (allow_unsealed: as Bundle.load, for a format-1 bundle)."""
    from .backends import BACKENDS
    from .converter import Converter

    results = []
    for name, device, precision in _targets(bundle):
        shown = device or BACKENDS[name].resolve_device(None)
        problem = BACKENDS[name].unavailable(bundle, precision, device)
        if problem is not None:
            results.append(GoldenResult(name, shown, precision, "skipped", str(problem)))
            continue
        try:
            with Converter.load(bundle.path, backend=name, precision=precision, device=device,
                                allow_unsealed=allow_unsealed) as converter:
                got = run_golden(converter, golden)
        except BackendError as err:  # a GPU stack that fails at load is this machine's problem, reported
            results.append(GoldenResult(name, shown, precision, "FAILED", f"could not run: {err}"))
            continue
        ok, errors, why = compare(precision, got, golden)
        results.append(GoldenResult(name, shown, precision, "ok" if ok else "FAILED", why, errors))
    return results
