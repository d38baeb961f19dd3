"""`vce export-triton BUNDLE OUT`: a Triton Inference Server model repository from a bundle.

    OUT/
      vce_convertor_onnx/  config.pbtxt, 1/model.onnx   the convertor on Triton's onnxruntime backend
      vce_convertor_trt/   config.pbtxt, 1/model.plan   the convertor on Triton's tensorrt backend
                                                        (built on the serving GPU: README)
      vce_noise/           config.pbtxt, 1/model.py     Python backend: the latents, from each request's seed
      vce_convert/         config.pbtxt                 ensemble: noise -> convertor (onnx)
      vce_convert_trt/     config.pbtxt                 ensemble: noise -> convertor (tensorrt)
      README.md

Dynamic batching (max_batch_size, max_queue_delay_microseconds) is the same pair of numbers
as `vce serve --max-batch --max-wait-ms`. A Triton request to vce_convert is one glyph's n
samples: Q repeated n times along the batch axis, SEED and TEMPERATURE per row (row 0's are
used), so it answers what `Converter.convert(glyph, n, seed)` answers on the host stream.
Triton itself is not run here (docs/serving.md, "Triton"): the tests parse every config with
Triton's own protobuf schema and run the noise model's `execute` against a stand-in of
triton_python_backend_utils.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .bundle import Bundle
from .bundle_swap import atomic_directory
from .contract import MODEL_IO, tensor_shapes
from .errors import InputError
from .inputs import positive_int

CONVERTOR = {"onnx": "vce_convertor_onnx", "trt": "vce_convertor_trt"}
ENSEMBLE = {"onnx": "vce_convert", "trt": "vce_convert_trt"}
NOISE = "vce_noise"

# The Python backend model: draws each request's latents exactly as vce_deploy.HostLatentSampler
# does (numpy Philox, standard normal float32, times temperature). Self-contained on purpose:
# Triton's Python backend environment need not have vce_deploy installed.
NOISE_MODEL = '''"""vce_noise: the latents of one `convert` request, from its own seed (written by vce export-triton).

Noise is drawn per request, never per dynamically batched group: Triton hands execute() the
requests of a batch separately, and each gets the stream of its own SEED.
"""
import numpy as np

LATENT_DIM = {latent_dim}


def draw(seed, count, temperature):
    """(count, LATENT_DIM) float32: the numbers vce_deploy.HostLatentSampler(seed).draw gives."""
    eps = np.random.Generator(np.random.Philox(int(seed))).standard_normal((count, LATENT_DIM), dtype=np.float32)
    return eps if temperature == 1.0 else eps * np.float32(temperature)


class TritonPythonModel:
    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "Q").as_numpy().shape[0]
            seed = pb_utils.get_input_tensor_by_name(request, "SEED").as_numpy().reshape(-1)[0]
            temperature = pb_utils.get_input_tensor_by_name(request, "TEMPERATURE").as_numpy().reshape(-1)[0]
            if seed < 0 or not 0 < temperature <= 1e4:
                error = pb_utils.TritonError(f"expected SEED >= 0 and 0 < TEMPERATURE <= 1e4, got {{seed}}, {{temperature}}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            latents = draw(seed, rows, float(temperature))
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("Z", latents)]))
        return responses
'''


def _tensor(name: str, dims: tuple[int, ...], data_type: str = "TYPE_FP32") -> str:
    return f'  {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ] }}'


def _io_block(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _dynamic_batching(max_batch: int, delay_us: int) -> str:
    preferred = sorted({size for size in (max_batch // 4, max_batch // 2, max_batch) if size >= 1})
    return (f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
            f"  max_queue_delay_microseconds: {delay_us}\n}}\n")


def convertor_config(name: str, platform: str, shapes: dict, max_batch: int, delay_us: int) -> str:
    inputs, outputs = MODEL_IO["convertor"].inputs, MODEL_IO["convertor"].outputs
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
            + _io_block("input", [_tensor(t, shapes[t]) for t in inputs])
            + _io_block("output", [_tensor(t, shapes[t]) for t in outputs])
            + _dynamic_batching(max_batch, delay_us))


def noise_config(shapes: dict, max_batch: int) -> str:
    # no dynamic_batching: each request is one seed's stream, drawn in its own execute() entry
    return (f'name: "{NOISE}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            + _io_block("input", [_tensor("Q", shapes["q"]), _tensor("SEED", (1,), "TYPE_INT64"),
                                  _tensor("TEMPERATURE", (1,))])
            + _io_block("output", [_tensor("Z", shapes["z"])])
            + 'instance_group [ { kind: KIND_CPU count: 1 } ]\n')


def ensemble_config(name: str, convertor: str, shapes: dict, max_batch: int) -> str:
    z, q = MODEL_IO["convertor"].inputs
    (y,) = MODEL_IO["convertor"].outputs
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
            + _io_block("input", [_tensor("Q", shapes["q"]), _tensor("SEED", (1,), "TYPE_INT64"),
                                  _tensor("TEMPERATURE", (1,))])
            + _io_block("output", [_tensor("Y", shapes["y"])])
            + "ensemble_scheduling {\n  step [\n"
            f'    {{ model_name: "{NOISE}" model_version: -1\n'
            '      input_map { key: "Q" value: "Q" }\n      input_map { key: "SEED" value: "SEED" }\n'
            '      input_map { key: "TEMPERATURE" value: "TEMPERATURE" }\n'
            '      output_map { key: "Z" value: "latents" } },\n'
            f'    {{ model_name: "{convertor}" model_version: -1\n'
            f'      input_map {{ key: "{z}" value: "latents" }}\n      input_map {{ key: "{q}" value: "Q" }}\n'
            f'      output_map {{ key: "{y}" value: "Y" }} }}\n'
            "  ]\n}\n")


README = """# Triton model repository for a VCE bundle (written by `vce export-triton`)

Precision {precision}, max batch {max_batch}, dynamic batching delay {delay_us} us.

    tritonserver --model-repository=$PWD

- `vce_convert` (ensemble): inputs Q [B, 1, {size}, {size}] float32 (one glyph repeated n times,
  preprocessed as vce_deploy.preprocess does), SEED [B, 1] int64, TEMPERATURE [B, 1] float32;
  output Y [B, 1, {size}, {size}] Bernoulli means. Row 0's SEED seeds the whole request.
- `vce_convert_trt` is the same over TensorRT. {plan_note}
- Triton's onnxruntime backend can also run TensorRT inside ONNX Runtime: add
  `optimization {{ execution_accelerators {{ gpu_execution_accelerator : [ {{ name : "tensorrt" }} ] }} }}`
  to vce_convertor_onnx/config.pbtxt.
"""


def export_triton(bundle_path: str | os.PathLike | None, out: str | os.PathLike, precision: str = "fp32",
                  max_batch: int = 64, max_queue_delay_us: int = 5000) -> Path:
    """Write the model repository to `out` (absent or empty) atomically; return its path."""
    max_batch = positive_int(max_batch, "max_batch")
    if isinstance(max_queue_delay_us, bool) or not isinstance(max_queue_delay_us, int) or max_queue_delay_us < 0:
        raise InputError(f"max_queue_delay_us: expected an integer >= 0, got {max_queue_delay_us!r}")
    bundle = Bundle.load(bundle_path)  # every file's sha256 checked before anything is copied
    manifest = bundle.manifest
    shapes = tensor_shapes(manifest.image_size, manifest.latent_dim)
    onnx_entry = bundle.model_entry("convertor", precision, "onnx")
    engines = bundle.entries("convertor", "tensorrt", precision)
    trt_batch = min(max_batch, engines[0].engine.max_batch) if engines and engines[0].engine else max_batch
    with atomic_directory(out) as stage:
        files = {
            f"{CONVERTOR['onnx']}/config.pbtxt": convertor_config(CONVERTOR["onnx"], "onnxruntime_onnx", shapes,
                                                                   max_batch, max_queue_delay_us),
            f"{CONVERTOR['trt']}/config.pbtxt": convertor_config(CONVERTOR["trt"], "tensorrt_plan", shapes,
                                                                  trt_batch, max_queue_delay_us),
            f"{NOISE}/config.pbtxt": noise_config(shapes, max_batch),
            f"{NOISE}/1/model.py": NOISE_MODEL.format(latent_dim=manifest.latent_dim),
            f"{ENSEMBLE['onnx']}/config.pbtxt": ensemble_config(ENSEMBLE["onnx"], CONVERTOR["onnx"], shapes, max_batch),
            f"{ENSEMBLE['trt']}/config.pbtxt": ensemble_config(ENSEMBLE["trt"], CONVERTOR["trt"], shapes, trt_batch),
        }
        plan_note = ("Its 1/model.plan is the bundle's engine, built for "
                     f"{engines[0].engine.gpu_name or 'compute capability ' + engines[0].engine.compute_capability}."
                     if engines else "1/model.plan is not included: an engine runs only on the GPU and TensorRT "
                     "version it was built for, so build it on the Triton host (`python -m export.tensorrt BUNDLE "
                     "--precision P --max-batch M`) and copy BUNDLE/engines/convertor.P.plan there, with M >= the "
                     "config's max_batch_size.")
        files["README.md"] = README.format(precision=precision, max_batch=max_batch, delay_us=max_queue_delay_us,
                                           size=manifest.image_size, plan_note=plan_note)
        for relative, text in files.items():
            path = stage / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (stage / CONVERTOR["onnx"] / "1").mkdir(parents=True, exist_ok=True)
        (stage / CONVERTOR["onnx"] / "1" / "model.onnx").write_bytes(bundle.read_verified(onnx_entry))
        (stage / CONVERTOR["trt"] / "1").mkdir(parents=True, exist_ok=True)
        if engines:
            shutil.copyfile(bundle.file(engines[0].path), stage / CONVERTOR["trt"] / "1" / "model.plan")
    return Path(out).resolve()
