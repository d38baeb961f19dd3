"""Parity of a bundle: every graph it holds, loaded by `Converter` on every backend that can run
it here, against the torch backend on the bundle's own checkpoint. The exporter runs it on the
staging bundle before anything is renamed into place, and `vce verify` runs it on a finished
one: one check, one input generator, one tolerance table (vce_deploy/tolerances.py).

In the spirit of optimum's exporter validation: the I/O names, dtypes and shapes are checked
when a backend loads the bundle (against the manifest, which export derives from
vce_deploy/contract.py); then values within a tolerance per precision, on real glyph pairs
and fresh N(0, I) latents, at several batch sizes. Every mismatch is collected, then all of
them are raised together as one ParityError.

numpy only: torch is imported by the torch backend, when the reference is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .contract import FILE_PRECISION, MODEL_IO, RUN_PRECISIONS
from .errors import BundleError, VCEError
from .tolerances import TOLERANCES, Tolerance

REFERENCE = "torch"
DEFAULT_BATCHES = (1, 7, 64)


@dataclass(frozen=True)
class Mismatch:
    kind: str  # load | shape | values
    backend: str
    precision: str
    model: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.backend} {self.precision} {self.model}] {self.kind}: {self.detail}"


class ParityError(BundleError):
    """All the mismatches of one parity check, raised together."""

    def __init__(self, mismatches: list[Mismatch], report: "ParityReport | None" = None):
        self.mismatches = list(mismatches)
        self.report = report
        lines = "\n  ".join(str(m) for m in self.mismatches)
        super().__init__(f"the bundle disagrees with eager PyTorch ({len(self.mismatches)} mismatches):\n  {lines}")


@dataclass(frozen=True)
class Row:
    model: str
    output: str
    batch: int
    max_abs: float
    mean_abs: float
    worst_excess: float  # max of |diff| - allowed; <= 0 passes

    @property
    def ok(self) -> bool:
        return self.worst_excess <= 0.0


@dataclass
class BackendParity:
    """One precision on one backend against the reference."""

    backend: str
    precision: str
    tolerance: Tolerance
    ran: bool
    ran_by: str  # what ran it (the backend's own description), or why it did not run here
    note: str = ""
    rows: list[Row] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def max_abs(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row in self.rows:
            out[row.output] = max(out.get(row.output, 0.0), row.max_abs)
        return out

    def to_dict(self) -> dict:
        return {"ran": self.ran, "ran_by": self.ran_by, "note": self.note, "ok": self.ok,
                "tolerance": {"atol": self.tolerance.atol, "rtol": self.tolerance.rtol},
                "batches": sorted({r.batch for r in self.rows}), "max_abs_error": self.max_abs(),
                "mismatches": [str(m) for m in self.mismatches]}

    def summary(self) -> str:
        """One line: the largest error per output and the verdict, or why it did not run."""
        if not self.ran:
            return f"parity {self.precision} on {self.backend}: not run here ({self.ran_by})"
        tol = self.tolerance
        errors = ", ".join(f"{name} {value:.2e}" for name, value in self.max_abs().items())
        return (f"parity {self.precision}: max |{self.backend} - {REFERENCE}| {errors} "
                f"(tolerance {tol.atol:g} + {tol.rtol:g}*|{REFERENCE}|): {'ok' if self.ok else 'FAILED'}")

    def text(self) -> str:
        lines = [self.summary()]
        if self.ran:
            lines.append(f"  ran by {self.ran_by}; tolerance: {self.tolerance.why}")
        if self.note:
            lines.append(f"  note: {self.note}")
        if self.rows:
            lines.append(f"  {'model':<10}{'output':<8}{'batch':>6}{'max abs':>12}{'mean abs':>12}  verdict")
            lines += [f"  {r.model:<10}{r.output:<8}{r.batch:>6}{r.max_abs:>12.3e}{r.mean_abs:>12.3e}  "
                      f"{'ok' if r.ok else 'FAIL'}" for r in self.rows]
        lines += [f"  {m}" for m in self.mismatches]
        return "\n".join(lines)


@dataclass
class ParityReport:
    checks: list[BackendParity] = field(default_factory=list)

    @property
    def mismatches(self) -> list[Mismatch]:
        return [m for check in self.checks for m in check.mismatches]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def text(self) -> str:
        return f"parity: every backend against eager PyTorch ({REFERENCE}, fp32) on real glyph pairs\n" + \
            "\n".join(check.text() for check in self.checks)

    def to_dict(self) -> dict:
        """backend -> precision -> its result (for the manifest's metrics)."""
        out: dict = {}
        for check in self.checks:
            out.setdefault(check.backend, {})[check.precision] = check.to_dict()
        return out

    def raise_if_failed(self) -> None:
        if self.mismatches:
            raise ParityError(self.mismatches, self)


def parity_inputs(glyphs: np.ndarray, batches, latent_dim: int, seed: int = 0) -> dict[int, dict[str, dict]]:
    """batch -> {model: its inputs}: real (x, q) pairs, two different drawings of one character,
    and fresh N(0, I) latents with the same real conditions. glyphs: (characters, drawings, H, W)
    preprocessed images, e.g. `vce_deploy.omniglot.load_split(...).images`."""
    glyphs = np.asarray(glyphs)
    if glyphs.ndim != 4 or glyphs.shape[1] < 2:
        raise ValueError(f"glyphs: expected (characters, drawings >= 2, H, W), got shape {glyphs.shape}")
    rng = np.random.default_rng(seed)
    cases = {}
    chars, drawings = glyphs.shape[:2]
    for batch in batches:
        c = rng.integers(0, chars, batch)
        i = rng.integers(0, drawings, batch)
        j = (i + rng.integers(1, drawings, batch)) % drawings  # a different drawing of the same character
        x = np.ascontiguousarray(glyphs[c, i][:, None], np.float32)
        q = np.ascontiguousarray(glyphs[c, j][:, None], np.float32)
        z = rng.standard_normal((batch, latent_dim)).astype(np.float32)
        cases[batch] = {"encoder": {"x": x, "q": q}, "convertor": {"z": z, "q": q}}
    return cases


def run_models(converter, inputs: dict[str, dict]) -> dict[str, np.ndarray]:
    """Both models of `converter` on one parity case -> every output by name."""
    mu, logvar = converter.run_encoder(inputs["encoder"]["x"], inputs["encoder"]["q"])
    return {"mu": mu, "logvar": logvar, "y": converter.run_convertor(inputs["convertor"]["z"], inputs["convertor"]["q"])}


def _compare(check: BackendParity, batch: int, got: dict, expected: dict) -> None:
    tolerance = check.tolerance
    for model, io in MODEL_IO.items():
        for name in io.outputs:
            have, want = got[name], expected[name]
            if have.shape != want.shape or have.dtype != np.float32:
                check.mismatches.append(Mismatch("shape", check.backend, check.precision, model, f"{name} at batch "
                                                 f"{batch}: expected {want.shape} float32, got {have.shape} {have.dtype}"))
                continue
            diff = np.abs(have.astype(np.float64) - want)
            excess = float(np.max(diff - tolerance.allowed(want))) if np.isfinite(diff).all() else float("inf")
            row = Row(model, name, batch, float(np.max(diff)), float(np.mean(diff)), excess)
            check.rows.append(row)
            if not row.ok:
                check.mismatches.append(Mismatch(
                    "values", check.backend, check.precision, model, f"{name} at batch {batch}: max abs error "
                    f"{row.max_abs:.3e}, allowed {tolerance.atol:g} + {tolerance.rtol:g}*|{REFERENCE}| "
                    f"(exceeded by {excess:.3e})"))


def _check_one(bundle, backend: str, precision: str, device: str, cases: dict, expected: dict,
               allow_unsealed: bool = False, options: dict | None = None, label: str | None = None) -> BackendParity:
    from .backends import BACKENDS
    from .converter import Converter

    tolerance = TOLERANCES[precision]
    label = label or backend
    problem = BACKENDS[backend].unavailable(bundle, precision, device)
    if problem is not None:
        return BackendParity(label, precision, tolerance, ran=False, ran_by=str(problem))
    try:
        converter = Converter.load(bundle.path, backend=backend, precision=precision, device=device,
                                   allow_unsealed=allow_unsealed, backend_options=options)
    except VCEError as err:
        reason = f"{backend} could not load it: {str(err).splitlines()[0]}"
        check = BackendParity(label, precision, tolerance, ran=False, ran_by=reason)
        if tolerance.must_run:
            check.mismatches.append(Mismatch("load", label, precision, "encoder+convertor", reason))
        return check
    with converter:
        check = BackendParity(label, precision, tolerance, ran=True, ran_by=converter.backend_info.detail)
        for batch, inputs in cases.items():
            _compare(check, batch, run_models(converter, inputs), expected[batch])
    return check


def check_parity(path: str | os.PathLike, glyphs: np.ndarray, batches=DEFAULT_BATCHES, device: str = "cpu",
                 backends=None, precisions=None, seed: int = 0, allow_unsealed: bool = False) -> ParityReport:
    """Every precision of the bundle at `path` on every backend (default: all but the reference)
    against the torch backend on its checkpoint, on `parity_inputs(glyphs, batches)`.

    A backend that cannot run a precision here (no engine, no GPU, not installed) is reported
    "not run here", not failed; but a precision whose tolerance says it must run (fp32, int8)
    and that no backend ran is a mismatch. Returns the report; `raise_if_failed` raises.
    allow_unsealed: as Bundle.load, for a format-1 bundle (`vce verify --allow-unsealed`).
    """
    from .backends import BACKENDS
    from .converter import Converter

    with Converter.load(path, backend=REFERENCE, device=device, allow_unsealed=allow_unsealed) as reference:
        bundle = reference.bundle
        cases = parity_inputs(glyphs, batches, reference.latent_dim, seed)
        expected = {batch: run_models(reference, inputs) for batch, inputs in cases.items()}
    have = {e.precision for e in bundle.entries(format="onnx")} | {e.precision for e in bundle.entries(format="tensorrt")}
    report = ParityReport()
    for precision in precisions or [p for p in RUN_PRECISIONS if FILE_PRECISION[p] in have]:
        checks = [_check_one(bundle, name, precision, device, cases, expected, allow_unsealed)
                  for name in backends or [n for n in BACKENDS if n != REFERENCE]]
        tensorrt_form = [e for e in bundle.entries("encoder", "onnx", precision) if e.consumer == "tensorrt"]
        if precision == "int8" and tensorrt_form and device == "cpu" and (backends is None or "onnxruntime" in backends):
            # TensorRT's own int8 form, judged here too (the same int8 tolerance), so a bundle never
            # ships a form no CPU check has seen; TensorRT itself runs it on the device
            checks.append(_check_one(bundle, "onnxruntime", precision, device, cases, expected,
                                     options={"int8_form": "tensorrt"}, label="onnxruntime-int8-tensorrt-form"))
        if TOLERANCES[precision].must_run and not any(check.ran or check.mismatches for check in checks):
            reasons = "; ".join(f"{c.backend}: {c.ran_by}" for c in checks)
            checks[-1].mismatches.append(Mismatch("load", "any backend", precision, "encoder+convertor",
                                                  f"no backend ran it here, and {precision} must run ({reasons})"))
        report.checks += checks
    return report
