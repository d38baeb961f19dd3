"""Step 3: the parity report. ONNX Runtime against eager PyTorch, in the spirit of Polygraphy's
`compare` and optimum's exporter validation: same I/O names, dtypes, dynamic batch axis and
shapes, then values within a tolerance per precision, on real test-alphabet image pairs and
fresh random latents at several batch sizes. Every mismatch is collected, then all of them
are raised together as one ParityError.

`OnnxModel` is also the runner the NLL evaluator (train/evaluate.py) drives: it has
run_encoder(x, q) -> (mu, logvar) and run_convertor(z, q) -> y on numpy float32 arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from vce_deploy.tolerances import TOLERANCES, Tolerance

from .onnx_export import BATCH, IO_NAMES, io_shapes


DEFAULT_BATCHES = (1, 7, 64)


@dataclass(frozen=True)
class Mismatch:
    kind: str  # names | dtype | shape | dynamic-axis | values | load
    precision: str
    role: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.precision} {self.role}] {self.kind}: {self.detail}"


class ParityError(RuntimeError):
    """All the mismatches of one parity check, raised together."""

    def __init__(self, mismatches: list[Mismatch], report: "ParityReport | None" = None):
        self.mismatches = list(mismatches)
        self.report = report
        lines = "\n  ".join(str(m) for m in self.mismatches)
        super().__init__(f"ONNX Runtime disagrees with eager PyTorch ({len(self.mismatches)} mismatches):\n  {lines}")


@dataclass(frozen=True)
class Row:
    role: str
    output: str
    batch: int
    max_abs: float
    mean_abs: float
    worst_excess: float  # max of |diff| - allowed; <= 0 passes

    @property
    def ok(self) -> bool:
        return self.worst_excess <= 0.0


@dataclass
class PrecisionReport:
    precision: str
    tolerance: Tolerance
    ran: bool
    ran_by: str  # the providers that ran it, or why it did not run here
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

    def text(self) -> str:
        tol = self.tolerance
        head = f"{self.precision}: {'ran by ' + self.ran_by if self.ran else 'NOT RUN HERE: ' + self.ran_by}"
        lines = [head] + ([f"  note: {self.note}"] if self.note else [])
        if self.ran:
            lines.append(f"  tolerance |onnx - torch| <= {tol.atol:g} + {tol.rtol:g}*|torch| ({tol.why})")
            lines.append(f"  {'model':<10}{'output':<8}{'batch':>6}{'max abs':>12}{'mean abs':>12}  verdict")
            for r in self.rows:
                lines.append(f"  {r.role:<10}{r.output:<8}{r.batch:>6}{r.max_abs:>12.3e}{r.mean_abs:>12.3e}  "
                             f"{'ok' if r.ok else 'FAIL'}")
        lines += [f"  {m}" for m in self.mismatches]
        return "\n".join(lines)


@dataclass
class ParityReport:
    precisions: dict[str, PrecisionReport] = field(default_factory=dict)

    def text(self) -> str:
        return "parity: ONNX Runtime against eager PyTorch (fp32) on real test-alphabet pairs\n" + \
            "\n".join(p.text() for p in self.precisions.values())

    def to_dict(self) -> dict:
        return {name: p.to_dict() for name, p in self.precisions.items()}

    def raise_if_failed(self) -> None:
        mismatches = [m for p in self.precisions.values() for m in p.mismatches]
        if mismatches:
            raise ParityError(mismatches, self)


class TorchReference:
    """Eager PyTorch fp32 (contiguous memory, as a user runs it) behind the numpy interface."""

    def __init__(self, vce):
        import torch

        self._torch = torch
        self.vce = vce.eval()

    def run_encoder(self, x, q):
        t = self._torch
        with t.inference_mode():
            mu, logvar = self.vce.encoder(t.from_numpy(np.ascontiguousarray(x)), t.from_numpy(np.ascontiguousarray(q)))
        return mu.numpy(), logvar.numpy()

    def run_convertor(self, z, q):
        t = self._torch
        with t.inference_mode():
            return self.vce.convertor(t.from_numpy(np.ascontiguousarray(z)), t.from_numpy(np.ascontiguousarray(q))).numpy()


def _ort_dims(shape) -> tuple:
    return tuple(d if isinstance(d, int) else (d or None) for d in shape)


ORT_FLOAT = "tensor(float)"


class OnnxModel:
    """One precision's encoder and convertor in ONNX Runtime on the CPU provider, with the
    same session settings the runtime uses (full graph optimisation)."""

    def __init__(self, encoder: Path, convertor: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.paths = {"encoder": Path(encoder), "convertor": Path(convertor)}
        self.sessions = {role: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                         for role, path in self.paths.items()}
        self.providers = self.sessions["convertor"].get_providers()
        self.ort_version = ort.__version__
        self.ran_by = f"onnxruntime {ort.__version__} {self.providers}"

    def io(self, role: str) -> tuple[list, list]:
        s = self.sessions[role]
        return ([(i.name, _ort_dims(i.shape), i.type) for i in s.get_inputs()],
                [(o.name, _ort_dims(o.shape), o.type) for o in s.get_outputs()])

    def run(self, role: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(IO_NAMES[role][1])
        return dict(zip(names, self.sessions[role].run(names, feeds)))

    def run_encoder(self, x, q):
        out = self.run("encoder", {"x": np.ascontiguousarray(x, np.float32), "q": np.ascontiguousarray(q, np.float32)})
        return out["mu"], out["logvar"]

    def run_convertor(self, z, q):
        return self.run("convertor", {"z": np.ascontiguousarray(z, np.float32),
                                      "q": np.ascontiguousarray(q, np.float32)})["y"]


class OpenVinoModel(OnnxModel):
    """The same interface on OpenVINO's CPU plugin with an inference precision hint: how the
    bf16 precision (the fp32 graph computed in bfloat16) is checked and its NLL measured."""

    TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)"}

    def __init__(self, encoder: Path, convertor: Path, hint: str = "bf16", threads: int | None = None):
        import openvino as ov

        from vce_deploy.cpu import this_cpu

        if hint == "bf16" and not this_cpu().native_bf16:
            raise RuntimeError(f"bf16 needs native bfloat16 (amx_bf16 or avx512_bf16); this CPU is "
                               f"{this_cpu().describe()}")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": hint, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.paths = {"encoder": Path(encoder), "convertor": Path(convertor)}
        self.compiled = {role: core.compile_model(core.read_model(str(path)), "CPU", config)
                         for role, path in self.paths.items()}
        self.requests = {role: compiled.create_infer_request() for role, compiled in self.compiled.items()}
        self.ran_by = f"openvino {ov.__version__.split('-')[0]} CPU, INFERENCE_PRECISION_HINT {hint}"

    def io(self, role: str) -> tuple[list, list]:
        def ports(items):
            return [(p.get_any_name(), tuple(d.get_length() if d.is_static else "batch" for d in p.get_partial_shape()),
                     self.TYPES.get(p.get_element_type().get_type_name(), p.get_element_type().get_type_name()))
                    for p in items]
        return ports(self.compiled[role].inputs), ports(self.compiled[role].outputs)

    def run(self, role: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.requests[role].infer(feeds)
        return {port.get_any_name(): np.array(value) for port, value in results.items()}


def base_precision(variant: str) -> str:
    """A file variant ("int8-cpu", "int8-tensorrt", "bf16") -> its precision's tolerance key."""
    return variant.split("-")[0]


# variant -> the runner that checks it (ONNX Runtime unless the precision needs another engine)
RUNNERS = {"bf16": OpenVinoModel}


def parity_cases(images: np.ndarray, batches, latent_dim: int, seed: int = 0) -> dict[int, dict[str, dict]]:
    """batch -> {role: feeds}: real (x, q) pairs, two different drawings of one test character,
    and fresh N(0, I) latents with the same real conditions. images: (chars, drawings, H, W)."""
    rng = np.random.default_rng(seed)
    cases = {}
    chars, drawings = images.shape[:2]
    for batch in batches:
        c = rng.integers(0, chars, batch)
        i = rng.integers(0, drawings, batch)
        j = (i + rng.integers(1, drawings, batch)) % drawings  # a different drawing of the same character
        x = np.ascontiguousarray(images[c, i][:, None], np.float32)
        q = np.ascontiguousarray(images[c, j][:, None], np.float32)
        z = rng.standard_normal((batch, latent_dim)).astype(np.float32)
        cases[batch] = {"encoder": {"x": x, "q": q}, "convertor": {"z": z, "q": q}}
    return cases


# role -> the reference's outputs as a tuple in IO_NAMES order
REFERENCE_CALLS = {
    "encoder": lambda ref, feeds: tuple(ref.run_encoder(feeds["x"], feeds["q"])),
    "convertor": lambda ref, feeds: (ref.run_convertor(feeds["z"], feeds["q"]),),
}


def _check_io(model: OnnxModel, role: str, precision: str, image_size: int, latent_dim: int) -> list[Mismatch]:
    shapes = io_shapes(role, image_size, latent_dim)
    found = []
    for kind, want, got in zip(("inputs", "outputs"), IO_NAMES[role], model.io(role)):
        names = tuple(name for name, _, _ in got)
        if names != want:
            found.append(Mismatch("names", precision, role, f"{kind}: expected {list(want)}, got {list(names)}"))
            continue
        for name, dims, dtype in got:
            if dtype != ORT_FLOAT:
                found.append(Mismatch("dtype", precision, role, f"{name}: expected {ORT_FLOAT}, got {dtype}"))
            if not dims or not isinstance(dims[0], str):
                found.append(Mismatch("dynamic-axis", precision, role,
                                      f"{name}: expected a symbolic batch axis 0, got {list(dims)}"))
            if tuple(dims[1:]) != shapes[name][1:]:
                found.append(Mismatch("shape", precision, role, f"{name}: expected {list(shapes[name])}, got {list(dims)}"))
    return found


def fp16_cast_note(path: Path) -> str:
    """Which ops of an fp16 graph ONNX Runtime's CPU provider actually ran in float32: it wraps
    nodes that lack a float16 CPU kernel in inserted Casts (InsertCastTransformer)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="vce-fp16-") as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(scratch) / "as_run.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        as_run = onnx.load(options.optimized_model_filepath)
    written = {n.name for n in onnx.load(str(path)).graph.node}
    inserted = {n.output[0] for n in as_run.graph.node if n.op_type == "Cast" and n.name not in written
                and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}
    in_fp32 = sorted({n.op_type for n in as_run.graph.node if n.op_type != "Cast" and set(n.input) & inserted})
    if not in_fp32:
        return "every fp16 node ran with a float16 CPU kernel"
    return (f"ONNX Runtime's CPU provider has no float16 kernel for {in_fp32} here and ran them in float32 "
            "between inserted Casts: this checks the fp16 weights and graph, not fp16 arithmetic as a GPU runs it")


# precision -> what the report must add about how ONNX Runtime really ran that graph
NOTES = {"fp16": fp16_cast_note}


def check_precision(reference, precision: str, encoder: Path, convertor: Path, cases: dict,
                    image_size: int, latent_dim: int, required: bool = True) -> tuple[PrecisionReport, OnnxModel | None]:
    """Run one precision variant against the reference on every case. `required=False` turns a
    graph that its runner cannot load here into a "not run here" report instead of a mismatch."""
    tolerance = TOLERANCES[base_precision(precision)]
    runner = RUNNERS.get(precision, OnnxModel)
    try:
        model = runner(encoder, convertor)
    except Exception as err:  # ORT's / OpenVINO's own exception types (NotImplemented, Fail, ImportError)
        reason = f"{runner.__name__} cannot run it on this machine: {str(err).splitlines()[0]}"
        report = PrecisionReport(precision, tolerance, ran=False, ran_by=reason)
        if required:
            report.mismatches.append(Mismatch("load", precision, "encoder+convertor", reason))
        return report, None
    report = PrecisionReport(precision, tolerance, ran=True, ran_by=model.ran_by)
    if precision in NOTES:
        report.note = NOTES[precision](convertor)
    for role in IO_NAMES:
        report.mismatches += _check_io(model, role, precision, image_size, latent_dim)
    if report.mismatches:
        return report, model
    for batch, feeds in cases.items():
        for role in IO_NAMES:
            expected = dict(zip(IO_NAMES[role][1], REFERENCE_CALLS[role](reference, feeds[role])))
            got = model.run(role, feeds[role])
            for name, want in expected.items():
                have = got[name]
                if have.shape != want.shape or have.dtype != np.float32:
                    report.mismatches.append(Mismatch("shape", precision, role, f"{name} at batch {batch}: expected "
                                                      f"{want.shape} float32, got {have.shape} {have.dtype}"))
                    continue
                diff = np.abs(have.astype(np.float64) - want)
                excess = float(np.max(diff - tolerance.allowed(want))) if diff.size else 0.0
                if not np.isfinite(diff).all():
                    excess = float("inf")
                row = Row(role, name, batch, float(np.max(diff)), float(np.mean(diff)), excess)
                report.rows.append(row)
                if not row.ok:
                    report.mismatches.append(Mismatch(
                        "values", precision, role, f"{name} at batch {batch}: max abs error {row.max_abs:.3e}, "
                        f"allowed {tolerance.atol:g} + {tolerance.rtol:g}*|torch| (exceeded by {excess:.3e})"))
    return report, model


def run_parity(reference, files: dict[str, tuple[Path, Path]], images: np.ndarray, image_size: int,
               latent_dim: int, batches=DEFAULT_BATCHES, seed: int = 0) -> tuple[ParityReport, dict[str, OnnxModel]]:
    """files: precision variant -> (encoder.onnx, convertor.onnx). fp16 and bf16 may be "not run
    here" (no fp16 provider, no native bf16); fp32 and both int8 forms must run. Returns the report (not raised) and the runners."""
    cases = parity_cases(images, batches, latent_dim, seed)
    report, runners = ParityReport(), {}
    for precision, (encoder, convertor) in files.items():
        result, model = check_precision(reference, precision, encoder, convertor, cases, image_size, latent_dim,
                                        required=TOLERANCES[base_precision(precision)].must_run)
        report.precisions[precision] = result
        if model is not None:
            runners[precision] = model
    return report, runners


__all__ = ["BATCH", "DEFAULT_BATCHES", "Mismatch", "OnnxModel", "OpenVinoModel", "base_precision", "ParityError", "ParityReport", "PrecisionReport",
           "TOLERANCES", "Tolerance", "TorchReference", "check_precision", "parity_cases", "run_parity"]
