"""Step 2: the fp32 ONNX graphs -> fp16 and int8 QDQ graphs, each checked like the fp32 one.

TensorRT 10/11 builds strongly typed networks: precision lives in the ONNX file.
- fp16: every weight and activation in float16, inputs and outputs kept float32, so callers
  never change (ONNX Runtime's transformers float16 converter, keep_io_types=True).
- int8: QDQ (QuantizeLinear/DequantizeLinear pairs around each Conv), per-channel symmetric
  int8 weights, float biases, in two forms, one per consumer (contract.CONSUMERS):
  "tensorrt": symmetric int8 activations, zero points 0, the only form TensorRT's explicit
  quantization takes; "cpu": asymmetric uint8 activations, the form ONNX Runtime's x86 U8S8
  kernels and OpenVINO run fast (bench/int8_formats.py: 2.3x fp32 against 0.6x for the
  symmetric form on a VNNI Xeon). Ranges come from real training images (see
  `calibration_batches`), never from random noise.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from .onnx_export import check_graph

# Only Convs carry int8: the residual Adds, the row mean and the final Sigmoid stay in float.
# A quantized sigmoid would round Bernoulli means near 0 and 1 to a 1/127 grid, and the NLL
# (log y, log 1-y per pixel) pays for that heavily.
INT8_OP_TYPES = ["Conv"]


def stem_conv(model: onnx.ModelProto) -> str:
    """The first Conv, the one that reads the inputs. It stays float: on the trained default
    model an int8 stem moved the encoder's logvar by up to 2.2 on test pairs (0.32 with it in
    float), for under 1% of the FLOPs (2 or 3 input channels against 32 in every other Conv)."""
    return next(node.name for node in model.graph.node if node.op_type == "Conv")


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each follows its inputs' producers (the float16 converter appends its
    input Casts at the end, which onnx.checker rightly rejects)."""
    ready = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(name in ready for name in n.input)]
        if not runnable:
            raise ValueError(f"graph has a cycle or a dangling input near node {pending[0].name!r}")
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if all(n is not r for r in runnable)]
    del graph.node[:]
    graph.node.extend(ordered)


def to_fp16(src: Path, dst: Path, role: str, image_size: int, latent_dim: int, opset: int) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    topological_sort(model.graph)
    model = check_graph(model, role, image_size, latent_dim, opset)  # float32 I/O asserted here
    floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    if floats:
        raise ValueError(f"{dst.name}: expected every weight in float16, got float32 initializers {floats[:5]}")
    onnx.save(model, str(dst))
    return model


def fp16_cast_note(path: Path) -> str:
    """Which ops of an fp16 graph ONNX Runtime's CPU provider actually ran in float32: it wraps
    nodes that lack a float16 CPU kernel in inserted Casts (InsertCastTransformer)."""

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


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over prepared feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._iter: Iterator = iter(self._feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def calibration_batches(encoder, x: np.ndarray, q: np.ndarray, batch: int = 64, seed: int = 0) -> dict[str, list[dict]]:
    """Calibration feeds for both graphs from real training pairs (x, q).

    encoder: the pairs themselves. convertor: the same real conditions q with two kinds of
    latents, half each, because both reach it in use: z ~ q(z | x, q) from the fp32 encoder
    (what the NLL evaluator and `transfer` feed) and z ~ N(0, I) (what `convert` feeds).
    `encoder` is anything with run_encoder(x, q) -> (mu, logvar) in fp32.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, list[dict]] = {"encoder": [], "convertor": []}
    for start in range(0, len(x), batch):
        xs, qs = x[start:start + batch], q[start:start + batch]
        feeds["encoder"].append({"x": xs, "q": qs})
        mu, logvar = encoder.run_encoder(xs, qs)
        posterior = mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape)
        prior = rng.standard_normal(mu.shape)
        use_prior = (np.arange(len(xs)) % 2 == 1)[:, None]
        feeds["convertor"].append({"z": np.where(use_prior, prior, posterior).astype(np.float32), "q": qs})
    return feeds


# consumer -> (activation type, activations symmetric); weights are symmetric int8 in both
INT8_FORMS = {"tensorrt": ("QInt8", True), "cpu": ("QUInt8", False)}


# The int8 graphs are checked against fp32 on held-out training pairs before the bundle's own
# parity check (vce_deploy/verify.py, test glyphs) runs; they aim below this share of the int8
# tolerance so that check, on other inputs, passes with room.
INT8_CHECK_MARGIN = 0.8


def to_int8(src: Path, dst: Path, role: str, feeds: list[dict[str, np.ndarray]], image_size: int,
            latent_dim: int, opset: int, consumer: str = "tensorrt",
            check_feeds: list[dict[str, np.ndarray]] | None = None) -> list[str]:
    """Quantize every Conv but the stem; returns the Convs left in float.

    With `check_feeds` (held-out real inputs), the int8 graph's worst error against fp32 on them
    must stay below INT8_CHECK_MARGIN of the int8 tolerance. Where it does not, the Convs whose
    int8 error alone is largest (each quantized with every other Conv float) stay float, worst
    first, until it does: mixed precision, as NNCF's ignored scope or TensorRT's per-layer
    precision do it. It always ends holding: with every Conv float the graph is the fp32 one
    (the manifest then says so; the step-257,000 campaign model's TensorRT-form encoder still
    missed the margin with 8 of its 17 Convs float, docs/export.md).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise ValueError(f"{role}: expected calibration batches of real images, got none")
    with tempfile.TemporaryDirectory(prefix="vce-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # folds constants and fixes shapes so the quantizer sees every Conv with known shapes
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        stem = stem_conv(graph)
        floats = [stem]
        _quantize(prepared, dst, feeds, consumer, floats)
        if check_feeds is not None and int8_error(src, dst, check_feeds) > INT8_CHECK_MARGIN:
            convs = [n.name for n in graph.graph.node if n.op_type == "Conv" and n.name != stem]
            probe, alone = Path(scratch) / "probe.onnx", {}
            for conv in convs:  # ranges from a few batches: the ranking, not the shipped graph
                _quantize(prepared, probe, feeds[:12], consumer, floats, only=[conv])
                alone[conv] = int8_error(src, probe, check_feeds)
            worst_first = sorted(convs, key=lambda c: -alone[c])
            for count in range(1, len(convs) + 1):
                floats = [stem] + worst_first[:count]
                _quantize(prepared, dst, feeds, consumer, floats)
                if int8_error(src, dst, check_feeds) <= INT8_CHECK_MARGIN:
                    break
    model = check_graph(onnx.load(str(dst)), role, image_size, latent_dim, opset)
    check_qdq(model, role, float_convs=set(floats), consumer=consumer)
    onnx.save(model, str(dst))
    return floats


def _quantize(prepared: Path, dst: Path, feeds, consumer: str, floats: list[str], only: list[str] | None = None):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    activation, symmetric = INT8_FORMS[consumer]
    quantize_static(
        str(prepared), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=INT8_OP_TYPES, per_channel=True, reduce_range=False,
        activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=floats, nodes_to_quantize=only or [],
        # biases stay float: TensorRT's explicit quantization folds them itself and its parser
        # takes int8 (not int32) into DequantizeLinear; ONNX Runtime accepts both
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": False},
    )


def int8_error(fp32: Path, int8: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """The worst |int8 - fp32| over every output of `feeds`, as a share of the int8 tolerance
    (vce_deploy/tolerances.py), both graphs on ONNX Runtime's CPU provider, one thread."""
    import onnxruntime as ort

    from vce_deploy.tolerances import TOLERANCES

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in (fp32, int8)]
    worst = 0.0
    for feed in feeds:
        reference, quantized = (session.run(None, feed) for session in sessions)
        for ref, got in zip(reference, quantized):
            worst = max(worst, float((np.abs(got - ref) / TOLERANCES["int8"].allowed(ref)).max()))
    return worst


def check_qdq(model: onnx.ModelProto, role: str, float_convs: set[str] = frozenset(),
              consumer: str = "tensorrt") -> None:
    """Every Conv but `float_convs` reads dequantized int8 data and weights. "tensorrt": every
    zero point is int8 0 (symmetric); "cpu": activations are uint8 (any zero point), weights
    int8 with zero point 0."""
    producers = {out: node for node in model.graph.node for out in node.output}
    consts = {t.name: t for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type == "Conv" and node.name not in float_convs:
            for name in node.input[:2]:
                feeder = producers.get(name)
                if feeder is None or feeder.op_type != "DequantizeLinear":
                    problems.append(f"Conv {node.name} input {name}: expected DequantizeLinear, got "
                                    f"{feeder.op_type if feeder else 'a plain tensor'}")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = consts.get(node.input[2])
            if zero is not None:
                values = onnx.numpy_helper.to_array(zero)
                uint8_activation = consumer == "cpu" and values.dtype == np.uint8
                if not uint8_activation and (values.dtype != np.int8 or np.any(values != 0)):
                    problems.append(f"{node.op_type} {node.name}: expected int8 zero point 0"
                                    f"{' (or uint8 activations)' if consumer == 'cpu' else ''}, got {values.dtype} "
                                    f"{values.ravel()[:4]}")
    if problems:
        raise ValueError(f"{role} int8 graph ({consumer} form) is not the expected QDQ on every Conv:\n  "
                         + "\n  ".join(problems))
