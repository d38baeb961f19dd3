"""Step 1: a PyTorch encoder or convertor -> one fp32 ONNX file, validated.

The torch.onnx (dynamo) exporter traces the module with batch as the only dynamic axis;
the result must pass onnx.checker (full check) and strict shape inference, keep the I/O
names of the bundle contract, and have no dynamic dimension but "batch" anywhere in the
graph. onnxslim then simplifies the graph, and the simplified graph is kept only if ONNX
Runtime gives the same outputs as the unsimplified one.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from vce_deploy.contract import BATCH_AXIS, MODEL_IO, batched_shapes

# The dynamo exporter emits opset 18 natively; asking it for 17 runs onnx's version converter,
# which fails on ReduceMean (axes input -> attribute) and silently falls back to 18.
DEFAULT_OPSET = 18
# Simplification must not move any output by more than this (fp32 reassociation noise).
SLIM_TOLERANCE = 1e-6


class ExportError(RuntimeError):
    """An exported graph is not what the bundle contract expects."""


@dataclass(frozen=True)
class OnnxInfo:
    path: Path
    opset: int
    nodes: int
    slimmed: bool  # onnxslim's graph kept (it matched the unsimplified one)
    slim_note: str  # why not, or what it removed


def example_inputs(role: str, image_size: int, latent_dim: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 inputs for `role` at `batch` (for tracing and graph-to-graph checks only;
    parity against PyTorch uses real images, see vce_deploy/verify.py)."""
    rng = np.random.default_rng(seed)
    shapes = batched_shapes(role, image_size, latent_dim)
    out = {}
    for name in MODEL_IO[role].inputs:
        shape = (batch, *shapes[name][1:])
        out[name] = (rng.random(shape) < 0.2).astype(np.float32) if len(shape) == 4 else \
            rng.standard_normal(shape).astype(np.float32)
    return out


def _dims(value_info: onnx.ValueInfoProto) -> tuple:
    return tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                 for d in value_info.type.tensor_type.shape.dim)


def check_graph(model: onnx.ModelProto, role: str, image_size: int, latent_dim: int, opset: int,
                io_dtype: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """onnx.checker + strict shape inference + the I/O contract; returns the inferred model.
    Every problem found is reported at once."""
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    problems = []
    got_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got_opset != opset:
        problems.append(f"opset: expected {opset}, got {got_opset}")
    want_in, want_out = MODEL_IO[role].inputs, MODEL_IO[role].outputs
    shapes = batched_shapes(role, image_size, latent_dim)
    for kind, want, have in (("inputs", want_in, inferred.graph.input), ("outputs", want_out, inferred.graph.output)):
        names = tuple(v.name for v in have)
        if names != want:
            problems.append(f"{kind}: expected {list(want)}, got {list(names)}")
            continue
        for value in have:
            if value.type.tensor_type.elem_type != io_dtype:
                problems.append(f"{value.name} dtype: expected {onnx.TensorProto.DataType.Name(io_dtype)}, got "
                                f"{onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)}")
            if _dims(value) != shapes[value.name]:
                problems.append(f"{value.name} shape: expected {list(shapes[value.name])}, got {list(_dims(value))}")
    # no data-dependent or extra symbolic dimension may hide inside the graph (TensorRT needs
    # every shape to follow from the batch alone)
    for value in inferred.graph.value_info:
        odd = [d for d in _dims(value) if not (isinstance(d, int) and d > 0) and d != BATCH_AXIS]
        if odd:
            problems.append(f"intermediate {value.name}: expected static dims or {BATCH_AXIS!r}, got {list(_dims(value))}")
    if problems:
        raise ExportError(f"{role} ONNX graph breaks the bundle contract:\n  " + "\n  ".join(problems))
    return inferred


def _ort_outputs(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graphs as written
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _slim(model: onnx.ModelProto, role: str, image_size: int, latent_dim: int, opset: int) -> tuple[onnx.ModelProto, bool, str]:
    try:
        import onnxslim
    except ImportError:
        return model, False, "onnxslim not installed"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(model)
        slim = check_graph(slim, role, image_size, latent_dim, opset)
    except Exception as err:  # any failure of an optional optimiser: keep the exported graph
        return model, False, f"onnxslim failed or broke the contract: {err}"
    for batch in (1, 7):
        inputs = example_inputs(role, image_size, latent_dim, batch, seed=batch)
        for name, a, b in zip(MODEL_IO[role].outputs, _ort_outputs(model, inputs), _ort_outputs(slim, inputs)):
            diff = float(np.max(np.abs(a - b)))
            if a.shape != b.shape or not diff <= SLIM_TOLERANCE:
                return model, False, (f"onnxslim changed {name} at batch {batch} (max abs diff {diff:.2e}, "
                                      f"allowed {SLIM_TOLERANCE:.0e}); kept the exported graph")
    before, after = len(model.graph.node), len(slim.graph.node)
    return slim, True, f"{before} -> {after} nodes, outputs unchanged"


def export_onnx(module, role: str, image_size: int, latent_dim: int, path: Path, opset: int = DEFAULT_OPSET,
                slim: bool = True) -> OnnxInfo:
    """Export `module` (Encoder or Convertor, eval mode) to `path` as one self-contained file."""
    import torch

    if role not in MODEL_IO:
        raise ValueError(f"role: expected one of {sorted(MODEL_IO)}, got {role!r}")
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset: expected >= {DEFAULT_OPSET} (the dynamo exporter's lowest that converts this "
                         f"model; 17 fails in onnx's version converter on ReduceMean), got {opset}")
    input_names, output_names = MODEL_IO[role].inputs, MODEL_IO[role].outputs
    # batch 3 when tracing, so the exporter cannot specialise the batch to 0 or 1
    example = {k: torch.from_numpy(v) for k, v in example_inputs(role, image_size, latent_dim, 3).items()}
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=1 << 20)
    dynamic_shapes = {name: {0: batch} for name in input_names}
    module = module.eval()
    # torch.onnx logs one warning per torchvision op it cannot register; none is used here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress chatter; real failures raise
        torch.onnx.export(module, tuple(example[n] for n in input_names), str(path), input_names=list(input_names),
                          output_names=list(output_names), opset_version=opset, dynamo=True,
                          dynamic_shapes=dynamic_shapes, external_data=False, optimize=True)
    model = check_graph(onnx.load(str(path)), role, image_size, latent_dim, opset)
    slimmed, note = False, "not asked"
    if slim:
        model, slimmed, note = _slim(model, role, image_size, latent_dim, opset)
    # keep the inferred shapes in the file: ORT and TensorRT both read them
    onnx.save(model, str(path))
    return OnnxInfo(Path(path), opset, len(model.graph.node), slimmed, note)
