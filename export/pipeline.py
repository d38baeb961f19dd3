"""Checkpoint -> bundle: ONNX (fp32, fp16, int8 QDQ), the manifest, then the bundle verified
by the runtime (parity on every backend, NLL per precision), all in a staging directory.

The bundle is built in a temporary sibling directory and swapped into place only after the
parity check passed and the finished bundle verified, so a failed or killed export leaves the
old bundle (or nothing) at `out`, never half a bundle.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from vce_deploy.bundle import FORMAT_VERSION, Bundle, FileEntry, Manifest, TensorSpec, file_entry, write_manifest
from vce_deploy.bundle_swap import atomic_directory, check_replaceable
from vce_deploy.contract import FILE_PRECISION, IO_DTYPE, MODEL_IO, MODELS, RUN_PRECISIONS, batched_shapes
from vce_deploy.verify import DEFAULT_BATCHES

from .onnx_export import DEFAULT_OPSET

# NLL per precision: a fixed, evenly spread subset of the protocol targets and a K small
# enough for a minute or two per precision on 2 CPU cores with the default model. The cost of
# int8 is the paired difference on identical noise (same seed), which needs far fewer samples
# than the NLL itself.
NLL_SUBSET = 64
NLL_K = 100
CALIBRATION_PAIRS_PER_CHARACTER = 4  # 136 training characters -> 544 real (x, q) pairs
SUFFIX = {"fp32": "", "fp16": ".fp16", "int8": ".int8"}
CONSUMER_SUFFIX = {"any": "", "tensorrt": "", "cpu": ".cpu"}  # encoder.int8.onnx (TensorRT), encoder.int8.cpu.onnx
# precision -> the file variants it exports: (variant name in the manifest metrics, consumer).
# bf16 has no file of its own: it is the fp32 graph computed in bfloat16, checked and measured
# on OpenVINO (contract.RUN_PRECISIONS)
VARIANTS = {"fp32": (("fp32", "any"),), "fp16": (("fp16", "any"),), "bf16": (("bf16", "any"),),
            "int8": (("int8-tensorrt", "tensorrt"), ("int8-cpu", "cpu"))}
LATENT_LAYOUT = "(H, 2): z[2r] and z[2r+1] belong to image row r"
PREPROCESSING = {  # docs/preprocessing.md
    "steps": ["grayscale", "invert unless the border mean is dark (strokes become 1)",
              "resize to image_size x image_size with a box (area) filter", "binarize at 0.5", "float32 {0, 1}"],
    "training_function": "vce_deploy.preprocess.preprocess_dataset",  # the steps above, what the model was trained on
    "function": "vce_deploy.preprocess.preprocess",  # user input, mapped onto the training images' frame
}


def model_file(role: str, precision: str, consumer: str = "any") -> str:
    """encoder.onnx, convertor.fp16.onnx, encoder.int8.onnx (TensorRT form), encoder.int8.cpu.onnx, ..."""
    precision = FILE_PRECISION[precision]
    return f"{role}{SUFFIX[precision]}{CONSUMER_SUFFIX[consumer]}.onnx"


def _check_precisions(precisions) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(precisions))
    unknown = [p for p in chosen if p not in RUN_PRECISIONS]
    if unknown:
        raise ValueError(f"precisions: expected a subset of {list(RUN_PRECISIONS)}, got unknown {unknown}")
    if "fp32" not in chosen:
        raise ValueError(f"precisions: expected fp32 among {list(chosen)}: it is the parity reference and the "
                         "source the fp16 and int8 graphs are made from")
    return chosen


def _weights_only(checkpoint: Path, stage: Path) -> None:
    """checkpoint.safetensors with the model tensors only (the optimizer state is training's
    business, and triples the size), and its sidecar as checkpoint.json."""
    from safetensors.torch import save_file

    from vce_deploy.checkpoint import load_tensors, read_meta

    tensors = {k: v.contiguous() for k, v in load_tensors(checkpoint).items() if k.startswith("model.")}
    if not tensors:
        raise ValueError(f"{checkpoint}: expected model.* tensors, got none")
    save_file(tensors, str(stage / "checkpoint.safetensors"))
    meta = dict(read_meta(checkpoint), exported_from=str(checkpoint), optimizer_state="removed by export")
    (stage / "checkpoint.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _calibration_pairs(train, seed: int, per_character: int = CALIBRATION_PAIRS_PER_CHARACTER
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Real training pairs, a few per character so every training alphabet sets the ranges."""
    rng = np.random.default_rng(seed)
    chars, drawings = train.images.shape[:2]
    c = np.repeat(np.arange(chars), per_character)
    i = rng.integers(0, drawings, len(c))
    j = (i + rng.integers(1, drawings, len(c))) % drawings
    order = rng.permutation(len(c))  # batches mix characters, as real traffic does
    return (np.ascontiguousarray(train.images[c, i][order, None]), np.ascontiguousarray(train.images[c, j][order, None]))


def _nll_metrics(stage: Path, runs, test, subset: int, k: int, seed: int, log, split: str) -> dict:
    from vce_deploy.converter import Converter
    from vce_deploy.nll import one_shot_nll
    from vce_deploy.omniglot import nll_targets, spread_subset

    x, q = nll_targets(test)
    protocol_targets = len(x)
    picks = spread_subset(len(x), subset)  # every test alphabet
    x, q = x[picks], q[picks]
    results: dict = {}
    for variant, (backend, precision, options) in runs.items():
        t0 = time.perf_counter()
        with Converter.load(stage, backend=backend, precision=precision, device="cpu",
                            backend_options=options) as converter:
            r = one_shot_nll(converter, x, q, k=k, seed=seed)
        results[variant] = {key: r[key] for key in ("nll_mean", "nll_sem", "elbo_mean", "elbo_sem")}
        results[variant]["seconds"] = round(time.perf_counter() - t0, 2)
        results[variant]["runner"] = converter.backend_info.detail
        results[variant]["per_target"] = np.asarray(r["nll_per_target"])
        log(f"nll {variant}: {r['nll_mean']:.3f} ± {r['nll_sem']:.3f} nats (K={k}, {len(x)} targets, "
            f"{results[variant]['seconds']:.1f} s, {backend} CPU)")
    reference = results.get("fp32", {}).get("per_target")
    for variant, r in results.items():
        per_target = r.pop("per_target")
        if variant != "fp32" and reference is not None:
            cost = per_target - reference  # paired: the same targets and the same noise
            r["cost_vs_fp32"] = float(cost.mean())
            r["cost_vs_fp32_sem"] = float(cost.std(ddof=1) / np.sqrt(len(cost))) if len(cost) > 1 else 0.0
            log(f"nll {variant} - fp32: {r['cost_vs_fp32']:+.4f} ± {r['cost_vs_fp32_sem']:.4f} nats (paired)")
    return {"protocol": {"k": k, "targets": int(len(x)), "of": protocol_targets, "split": split, "seed": seed,
                         "subset": "evenly spaced over the protocol targets (docs/design.md)",
                         "cost_vs_fp32": "mean over targets of NLL(variant) - NLL(fp32), same targets and "
                                         "importance-sampling noise (paired), with its standard error",
                         "runner": "per variant (pipeline.VARIANTS): its 'runner'"},
            **results}


def _nll_runs(report) -> dict[str, tuple[str, str, dict | None]]:
    """variant -> (backend, precision, backend_options) for every variant parity ran on the CPU:
    ONNX Runtime where it runs the precision (each int8 form by name), else OpenVINO (bf16)."""
    ran = {(c.backend, c.precision) for c in report.checks if c.ran}
    runs = {}
    for precision, variants in VARIANTS.items():
        for variant, consumer in variants:
            if ("onnxruntime", precision) in ran:
                options = {"int8_form": consumer} if precision == "int8" else None
                runs[variant] = ("onnxruntime", precision, options)
            elif ("openvino", precision) in ran:
                runs[variant] = ("openvino", precision, None)
    return runs


def _versions(opset: int) -> dict:
    import onnx
    import onnxruntime
    import torch

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                "opset": opset, "exporter": "torch.onnx.export(dynamo=True)"}
    try:
        import onnxslim
        versions["onnxslim"] = onnxslim.__version__
    except ImportError:
        pass
    return versions


def export_bundle(checkpoint, out, precisions=("fp32", "int8"), opset: int = DEFAULT_OPSET, *,
                  parity_batches=DEFAULT_BATCHES, measure_nll: bool = True, nll_subset: int = NLL_SUBSET,
                  nll_k: int = NLL_K, nll_seed: int = 0, slim: bool = True, data_dir=None,
                  split: str = "paper", log: Callable[[str], None] = print) -> Path:
    """Export `checkpoint` (.safetensors with its JSON sidecar) to the bundle directory `out`.

    Raises ParityError (every mismatch listed) when a backend's outputs leave their tolerance
    against the torch backend (`vce verify`'s own check, vce_deploy/verify.py), ExportError when
    a graph breaks the I/O contract; in both cases `out` is left exactly as it was. Returns the
    bundle path.
    """
    from vce_deploy.checkpoint import load_model
    from vce_deploy.converter import Converter
    from vce_deploy.omniglot import load_split
    from vce_deploy.verify import check_parity

    from .golden import GOLDEN_FILE, check_golden, write_golden
    from .onnx_export import export_onnx
    from .quantize import INT8_CHECK_MARGIN, calibration_batches, fp16_cast_note, to_fp16, to_int8

    precisions = _check_precisions(precisions)
    checkpoint, out = Path(checkpoint), Path(out)
    check_replaceable(out)  # before minutes of work: --out must be absent, empty or a bundle
    vce, meta = load_model(checkpoint)
    size, latent = vce.config.image_size, vce.config.latent_dim
    test = load_split(split, "test", data_dir)
    exporter = _versions(opset)
    reference = Converter.from_torch(vce, channels_last=False)  # eager fp32: calibration and golden outputs
    with atomic_directory(out) as stage:
        _weights_only(checkpoint, stage)
        slim_notes = {}
        for role in MODELS:
            info = export_onnx(getattr(vce, role), role, size, latent, stage / model_file(role, "fp32"), opset, slim)
            slim_notes[role] = info.slim_note
            log(f"fp32 {role}: opset {info.opset}, {info.nodes} nodes, onnxslim: {info.slim_note}")
        exporter["onnxslim_result"] = slim_notes
        if "fp16" in precisions:
            for role in MODELS:
                to_fp16(stage / model_file(role, "fp32"), stage / model_file(role, "fp16"), role, size, latent, opset)
        if "int8" in precisions:
            train = load_split(split, "train", data_dir)
            feeds = calibration_batches(reference, *_calibration_pairs(train, seed=0))
            # other pairs of the same training characters (never the test's) check the int8 graphs
            checks = calibration_batches(reference, *_calibration_pairs(train, seed=1, per_character=1), seed=1)
            float_convs = {}
            for _, consumer in VARIANTS["int8"]:
                for role in MODELS:
                    float_convs.setdefault(consumer, {})[role] = to_int8(
                        stage / model_file(role, "fp32"), stage / model_file(role, "int8", consumer), role,
                        feeds[role], size, latent, opset, consumer, check_feeds=checks[role])
                    log(f"int8 {role} ({consumer} form): float Convs {float_convs[consumer][role]}")
            exporter["int8_calibration"] = {
                "pairs": sum(len(f["x"]) for f in feeds["encoder"]), "source": "training alphabets, real (x, q) pairs",
                "convertor_latents": "half z ~ q(z|x,q) from the fp32 encoder, half z ~ N(0, I)",
                "method": "MinMax", "weights": "per-channel symmetric int8",
                "forms": {"tensorrt": "QDQ, symmetric int8 activations (zero point 0)",
                          "cpu": "QDQ, asymmetric uint8 activations (ONNX Runtime x86 U8S8, OpenVINO)"},
                "quantized_ops": ["Conv"], "float_ops": ["the stem Conv reading the inputs"],
                # mixed int8 (export/quantize.py to_int8): per form and graph, the Convs kept float
                "float_convs": float_convs,
                "check": f"worst error against fp32 on other training pairs <= {INT8_CHECK_MARGIN} of the int8 tolerance"}
        entries = _entries(stage, precisions, size, latent)
        entries[GOLDEN_FILE] = write_golden(stage, reference, test.images, latent)  # export/golden.py
        manifest = Manifest(
            format_version=FORMAT_VERSION, image_size=size, latent_dim=latent, latent_layout=LATENT_LAYOUT,
            preprocessing=PREPROCESSING, files=entries,
            model_config=meta.get("model_config", {}), train_config=meta.get("train_config", {}),
            step=int(meta.get("step", 0)), metrics={"training": meta.get("metrics", {})}, exporter=exporter)
        write_manifest(stage, manifest)  # the staging bundle is whole: verify it as a user would load it
        report = check_parity(stage, test.images, batches=parity_batches, precisions=precisions)
        for check in report.checks:
            if check.ran and check.backend == "onnxruntime" and check.precision == "fp16":
                check.note = fp16_cast_note(stage / model_file("convertor", "fp16"))
        log(report.text())
        report.raise_if_failed()  # before anything is renamed into place
        metrics = dict(manifest.metrics, parity=report.to_dict())
        if measure_nll:
            metrics["nll"] = _nll_metrics(stage, _nll_runs(report), test, nll_subset, nll_k, nll_seed, log, split)
        write_manifest(stage, dataclasses.replace(manifest, metrics=metrics))
        Bundle.load(stage, verify=True)  # the bundle reads back and every hash matches
        check_golden(stage, log)  # and passes the runtime's own check, the one `vce verify` runs
    log(f"bundle written: {out} ({len(manifest.files)} files)")
    return out


def _entries(stage: Path, precisions, size: int, latent: int) -> dict[str, FileEntry]:
    entries = {
        "checkpoint.safetensors": file_entry(stage, "checkpoint.safetensors", role="checkpoint", format="safetensors"),
        "checkpoint.json": file_entry(stage, "checkpoint.json", role="checkpoint-meta", format="json"),
    }
    for precision in precisions:
        if FILE_PRECISION[precision] != precision:  # bf16: no file of its own
            continue
        for _, consumer in VARIANTS[precision]:
            for role, io in MODEL_IO.items():
                shapes = batched_shapes(role, size, latent)
                rel = model_file(role, precision, consumer)
                entries[rel] = file_entry(
                    stage, rel, role=role, format="onnx", precision=precision, consumer=consumer,
                    inputs=tuple(TensorSpec(n, shapes[n], IO_DTYPE) for n in io.inputs),
                    outputs=tuple(TensorSpec(n, shapes[n], IO_DTYPE) for n in io.outputs))
    return entries
