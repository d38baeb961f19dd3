"""The Open Inference Protocol (KServe v2, what Triton, KServe and MLServer clients speak) for
`vce serve`: model metadata from the I/O contract, infer requests in JSON tensors or with the
binary tensor data extension, answers in the same two forms (docs/serving.md, "Open Inference
Protocol").

The served model is the whole conversion: input `q` (the conditions, B glyphs of H x W pixels,
FP32 in [0, 1] or UINT8 in [0, 255], preprocessed like every /v1 image), output `y` (B x n x S x S
Bernoulli means, FP32); n, seed and temperature are request parameters. The tensor names are
the convertor's own (vce_deploy/contract.py).

Binary extension: the header `Inference-Header-Content-Length: L` says the body's first L bytes
are the JSON request; each input with `parameters.binary_data_size` takes its bytes, in input
order, from what follows. An answer whose output asks `binary_data` (or whose request says
`binary_data_output`) carries the JSON header then the raw little-endian tensor bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..contract import MODEL_IO
from ..inputs import DEFAULT_TEMPERATURE
from .requests import ApiError, ServeSettings, dumps, json_body

MODEL = "vce"
VERSION = "1"
CONDITION = MODEL_IO["convertor"].inputs[1]  # "q": the condition glyphs
OUTPUT, = MODEL_IO["convertor"].outputs  # the Bernoulli means
HEADER_LENGTH = "inference-header-content-length"
DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}  # input datatypes taken for q
PARAMETERS = ("n", "seed", "temperature")


def model_metadata(image_size: int, info: dict) -> dict:
    return {"name": MODEL, "versions": [VERSION], "platform": f"vce_deploy/{info['backend']}",
            "inputs": [{"name": CONDITION, "datatype": "FP32", "shape": [-1, -1, -1]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, -1, image_size, image_size]}],
            "parameters": {"n": "int >= 1 (default 1)", "seed": "int >= 0 (default: random, reported)",
                           "temperature": f"number > 0 (default {DEFAULT_TEMPERATURE:g})", "q datatypes": sorted(DTYPES)}}


@dataclass(frozen=True)
class InferRequest:
    images: list[np.ndarray]  # B arrays of (H, W), views into the body: nothing copied
    fields: dict[str, Any]  # n, seed, temperature as given
    request_id: str | None
    binary_output: bool


def check_model(name: str, version: str | None) -> None:
    if name != MODEL:
        raise ApiError(404, "unknown_model", f"expected model {MODEL!r}, got {name!r}")
    if version not in (None, "", VERSION):
        raise ApiError(404, "unknown_model", f"expected version {VERSION!r} of {MODEL!r}, got {version!r}")


def parse_infer(body: bytes, header_length: str | None, settings: ServeSettings) -> InferRequest:
    """Bytes of a v2 infer request -> the glyphs and parameters; every refusal an ApiError."""
    view = memoryview(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, "bad_header", f"Inference-Header-Content-Length: expected an integer at most the "
                                              f"body's {len(body)} bytes, got {header_length!r}")
        split = int(header_length)
        data, binary = json_body(bytes(view[:split])), view[split:]
    else:
        data, binary = json_body(body), view[:0]
    inputs = data.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, "bad_input", f"inputs: expected a list of one tensor named {CONDITION!r}, "
                                         f"got {_describe(inputs)}")
    tensor = inputs[0]
    if tensor.get("name") != CONDITION:
        raise ApiError(400, "bad_input", f"inputs[0].name: expected {CONDITION!r}, got {tensor.get('name')!r}")
    array = _tensor(tensor, binary, settings)
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ApiError(400, "bad_parameter", f"parameters: expected an object, got {_describe(parameters)}")
    unknown = sorted(set(parameters) - set(PARAMETERS) - {"binary_data_output"})
    if unknown:
        raise ApiError(400, "bad_parameter", f"parameters: expected some of {list(PARAMETERS)}, got {unknown}")
    return InferRequest(list(array), {k: parameters[k] for k in PARAMETERS if k in parameters},
                        data.get("id") if isinstance(data.get("id"), str) else None,
                        _binary_output(data, parameters))


def _tensor(tensor: dict, binary: memoryview, settings: ServeSettings) -> np.ndarray:
    """q as (B, H, W) from its JSON data or its binary bytes, checked against the settings' limits."""
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if datatype not in DTYPES:
        raise ApiError(400, "bad_input", f"{CONDITION}.datatype: expected one of {sorted(DTYPES)}, got {datatype!r}")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ApiError(400, "bad_input", f"{CONDITION}.shape: expected [B, H, W] of positive integers, got {shape!r}")
    count, height, width = shape
    if count > settings.max_images:
        raise ApiError(413, "too_many_images", f"{CONDITION}: expected at most {settings.max_images} glyphs, got {count}")
    if height * width > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"{CONDITION}: expected at most {settings.max_image_pixels} pixels "
                                               f"per glyph, got {height} x {width}")
    dtype, size = DTYPES[datatype], count * height * width
    binary_size = (tensor.get("parameters") or {}).get("binary_data_size")
    if binary_size is not None:
        if binary_size != size * dtype.itemsize or len(binary) != binary_size:
            raise ApiError(400, "bad_input", f"{CONDITION}: expected {size * dtype.itemsize} bytes of binary data "
                                             f"for {datatype} {shape}, got binary_data_size {binary_size!r} and "
                                             f"{len(binary)} bytes after the JSON header")
        array = np.frombuffer(binary, dtype)  # a view of the body
    else:
        try:
            array = np.asarray(tensor.get("data"), dtype=dtype.newbyteorder("="))
        except (TypeError, ValueError, OverflowError):
            array = None
        if array is None or array.size != size:
            raise ApiError(400, "bad_input", f"{CONDITION}.data: expected {size} numbers for shape {shape}, got "
                                             f"{_describe(tensor.get('data'))}")
    array = array.reshape(shape)
    low, high = (0.0, 1.0) if datatype == "FP32" else (0, 255)
    finite = datatype != "FP32" or bool(np.isfinite(array).all())
    if not finite or array.min() < low or array.max() > high:
        raise ApiError(400, "bad_input", f"{CONDITION}: expected {datatype} values in [{low}, {high}], got values "
                                         f"in [{array.min()}, {array.max()}]")
    return array


def _binary_output(data: dict, parameters: dict) -> bool:
    outputs = data.get("outputs")
    if isinstance(outputs, list) and outputs:
        for output in outputs:
            if not isinstance(output, dict) or output.get("name") != OUTPUT:
                raise ApiError(400, "bad_output", f"outputs: expected only {OUTPUT!r}, got {_describe(outputs)}")
        return bool((outputs[0].get("parameters") or {}).get("binary_data", False))
    return bool(parameters.get("binary_data_output", False))


def infer_answer(samples: np.ndarray, request: InferRequest, seed: int) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the answer: JSON data, or the JSON header then y's raw bytes."""
    y = np.ascontiguousarray(samples, dtype="<f4")
    output: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(y.shape)}
    if request.binary_output:
        output["parameters"] = {"binary_data_size": y.nbytes}
    else:
        output["data"] = y.reshape(-1)
    answer = {"model_name": MODEL, "model_version": VERSION, "parameters": {"seed": seed}, "outputs": [output]}
    if request.request_id is not None:
        answer["id"] = request.request_id
    header = dumps(answer)
    if not request.binary_output:
        return header, {"Content-Type": "application/json"}
    return header + y.tobytes(), {"Content-Type": "application/octet-stream",
                                  "Inference-Header-Content-Length": str(len(header))}


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{type(value).__name__} ({text[:60]}...)"
