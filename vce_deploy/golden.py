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

from dataclasses import dataclass, field

import numpy as np

from .bundle import Bundle
from .errors import BackendError
from .golden_file import GOLDEN_FILE, INPUTS, OUTPUTS, Golden, load_golden  # the file's reader, re-exported here
from .tolerances import TOLERANCES

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


__all__ = ["GOLDEN_FILE", "INPUTS", "OUTPUTS", "Golden", "GoldenResult", "compare", "load_golden", "run_golden",
           "verify_golden"]
