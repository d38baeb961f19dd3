"""Request parsing and answer encoding for `vce serve` and the Ray Serve deployment: bytes and
parameters in, a checked `ConvertRequest` out; arrays in, PNG or JSON out.

Every limit lives in `ServeSettings`; every refusal is an `ApiError` carrying the HTTP status
and a message that names what was expected and what came (docs/serving.md, "Errors").
"""
from __future__ import annotations

import io
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from PIL import Image

from ..batching import ConvertRequest, make_request
from ..errors import InputError
from ..inputs import DEFAULT_TEMPERATURE
from ..grid import grid_image

try:  # the serve extra installs orjson (several times faster on arrays); json stays the fallback
    import orjson
except ImportError:  # pragma: no cover - only without the serve extra's orjson
    orjson = None

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp")
MAX_SEED = 2**63 - 1
JSON_DECIMALS = 4  # JSON answers are rounded: 1e-4 is below a pixel's 1/255; binary answers are exact
TENSOR_TYPES = {"float16": np.float16, "uint8": np.uint8}  # application/octet-stream answers
ANSWERS = ("json", "png", *TENSOR_TYPES)


@dataclass(frozen=True)
class ServeSettings:
    """Everything `vce serve` can be told; the defaults suit a glyph service on one CPU box."""

    max_batch: int = 64  # engine rows per merged batch; 0 turns batching off (each request runs alone)
    max_wait_ms: float = 5.0  # how long a batch's first request waits for company
    max_queue: int = 1024  # requests waiting for a batch; past it: 503 overloaded
    request_timeout_s: float = 30.0  # a request not answered by then: 504
    body_timeout_s: float = 10.0  # a client that has not sent its whole body by then: 408
    max_body_bytes: int = 4 << 20  # 413 past it (declared Content-Length or bytes actually sent)
    max_image_pixels: int = 2048 * 2048  # 413 past it, read from the image header before decoding
    max_images: int = 16  # glyphs per request
    max_n: int = 64  # variations per glyph
    inline_decode_pixels: int = 256 * 256  # smaller images are decoded on the event loop (cheaper than a thread hop)
    # production controls, all off by default (SECURITY.md)
    token: str | None = field(default=None, repr=False)  # a bearer token every non-probe route needs
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API
    access_log: bool = False  # one JSON line per request on the vce_deploy.serve.access logger
    max_connections: int | None = None  # requests in flight (health probes aside); past it a 503 with Retry-After


class ApiError(Exception):
    """An HTTP refusal: status, a short machine-readable code, and a sentence for people."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


# -- parameters ------------------------------------------------------------------------------


def _integer(value: Any, what: str, low: int, high: int) -> int:
    """An integer from JSON (int) or a query/form string ("12"); anything else is a 400."""
    if isinstance(value, str):
        text = value.strip()
        if not (text.isdigit() or (text.startswith("-") and text[1:].isdigit())):
            raise ApiError(400, "bad_parameter", f"{what}: expected an integer in [{low}, {high}], got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, "bad_parameter", f"{what}: expected an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ApiError(400, "bad_parameter", f"{what}: expected an integer in [{low}, {high}], got {value}")
    return value


def _number(value: Any, what: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_parameter", f"{what}: expected a number, got {value!r}") from None


@dataclass(frozen=True)
class Options:
    n: int
    seed: int
    temperature: float
    answer: str  # one of ANSWERS


def options(fields: Mapping[str, Any], accept: str | None, settings: ServeSettings, default_n: int = 1) -> Options:
    """n, seed, temperature and the answer format from query, form or JSON fields."""
    n = _integer(fields.get("n", default_n), "n", 1, settings.max_n)
    seed = fields.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else _integer(seed, "seed", 0, MAX_SEED)
    temperature = _number(fields.get("temperature", DEFAULT_TEMPERATURE), "temperature")
    answer = fields.get("format")
    if answer is None:
        answer = negotiated(accept)
    if answer not in ANSWERS:
        raise ApiError(400, "bad_parameter", f"format: expected one of {list(ANSWERS)}, got {answer!r}")
    return Options(n, seed, temperature, answer)


def negotiated(accept: str | None) -> str:
    """The answer format an Accept header asks for: JSON unless the client names only binary types
    (image/png: a grid; application/octet-stream: float16 tensor bytes)."""
    accept = (accept or "").lower()
    if "application/json" in accept:
        return "json"
    if "image/png" in accept:
        return "png"
    return "float16" if "application/octet-stream" in accept else "json"


# -- images ----------------------------------------------------------------------------------


def image_from_bytes(data: bytes, what: str, settings: ServeSettings) -> tuple[bytes, int]:
    """Check an encoded image from its header alone: (the bytes, its pixel count), or a 4xx."""
    if not data:
        raise ApiError(400, "empty_body", f"{what}: expected an image file, got an empty body")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
    except Image.DecompressionBombError as err:  # PIL's own header check, above ours
        raise ApiError(413, "image_too_large", f"{what}: expected at most {settings.max_image_pixels} pixels, "
                                               f"got {err}") from None
    except Exception as err:  # PIL raises many types for bytes that are not an image
        raise ApiError(400, "not_an_image", f"{what}: expected an image file (PNG, JPEG, ...), got {len(data)} "
                                            f"bytes that are not one ({type(err).__name__})") from None
    if width * height > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"{what}: expected at most {settings.max_image_pixels} pixels, "
                                               f"got {width} x {height} = {width * height} (from its header)")
    return data, width * height


def image_from_json(value: Any, what: str, settings: ServeSettings) -> np.ndarray:
    """A 2-D list of numbers: floats in [0, 1] or integers in [0, 255]."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None
    if array is None or array.ndim != 2 or array.dtype.kind not in "biuf" or 0 in array.shape:
        raise ApiError(400, "bad_image", f"{what}: expected a non-empty 2-D array of numbers (rows of equal "
                                         f"length), got {type(value).__name__}")
    if array.size > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"{what}: expected at most {settings.max_image_pixels} pixels, "
                                               f"got {array.shape[0]} x {array.shape[1]}")
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise ApiError(400, "bad_image", f"{what}: expected integers in [0, 255] or floats in [0, 1], got "
                                             f"integers in [{array.min()}, {array.max()}]")
        return array.astype(np.uint8)
    return array.astype(np.float32)


def json_body(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # deep nesting: found by fuzz/
        raise ApiError(400, "bad_json", f"expected a JSON object, got a body that is not JSON "
                                        f"({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", f"expected a JSON object, got {type(data).__name__}")
    return data


def json_images(data: Mapping, key: str, settings: ServeSettings) -> list[np.ndarray]:
    """data[key] (one 2-D array) or data[key + 's'] (a list of them)."""
    if key in data:
        return [image_from_json(data[key], key, settings)]
    many = data.get(key + "s")
    if not isinstance(many, list) or not many:
        raise ApiError(400, "bad_image", f"expected {key!r} (a 2-D array) or {key + 's'!r} (a non-empty list of "
                                         f"them) in the JSON body, got keys {sorted(data)}")
    if len(many) > settings.max_images:
        raise ApiError(413, "too_many_images", f"{key}s: expected at most {settings.max_images} images, got {len(many)}")
    return [image_from_json(item, f"{key}s[{i}]", settings) for i, item in enumerate(many)]


def parse_plain(kind: str, body: bytes, fields: dict, image_keys: tuple[str, ...],
                settings: ServeSettings) -> tuple[dict, dict[str, list]]:
    """A JSON body, or a raw image body (one image key only) -> (option fields, {key: images}).
    Image bytes are header-checked here and decoded later, in preprocessing."""
    if kind == "application/json":
        data = json_body(body)
        fields.update({k: data[k] for k in ("n", "seed", "temperature", "format") if k in data})
        return fields, {key: json_images(data, key, settings) for key in image_keys}
    if kind in IMAGE_TYPES and len(image_keys) == 1:
        return fields, {image_keys[0]: [image_from_bytes(body, "body", settings)[0]]}
    raise unsupported(kind, image_keys)


def unsupported(kind: str, image_keys: tuple[str, ...], multipart: bool = False) -> ApiError:
    accepted = ["application/json"] + (["multipart/form-data"] if multipart else []) + (
        list(IMAGE_TYPES) if len(image_keys) == 1 else [])
    return ApiError(415, "unsupported_media_type", f"Content-Type: expected one of {accepted}, got {kind or 'none'!r}")


def checked_request(converter, images: list, opts: Options) -> ConvertRequest:
    """Preprocess and check as `Converter.convert` does; its InputError becomes a 400."""
    try:
        return make_request(converter, images, opts.n, opts.seed, opts.temperature)
    except InputError as err:
        raise ApiError(400, "bad_input", str(err)) from None


# -- answers ---------------------------------------------------------------------------------


def png_grid(conditions: np.ndarray, samples: np.ndarray) -> bytes:
    """Conditions (B, 1, S, S) in the first column, their samples (B, n, S, S) beside them."""
    grid = np.concatenate([conditions, samples], axis=1)  # (B, 1 + n, S, S)
    png = io.BytesIO()
    grid_image(grid, scale=2).save(png, format="PNG")
    return png.getvalue()


def dumps(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON of a payload whose arrays are numpy (orjson writes them without a list copy)."""
    if orjson is not None:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(payload, separators=(",", ":"), default=np.ndarray.tolist).encode()


def json_answer(samples: np.ndarray, opts: Options, info: Mapping[str, Any]) -> bytes:
    payload = {"seed": opts.seed, "n": opts.n, "temperature": opts.temperature, "shape": list(samples.shape),
               **info, "images": np.ascontiguousarray(np.round(samples, JSON_DECIMALS), np.float32)}
    return dumps(payload)


def tensor_answer(samples: np.ndarray, answer: str) -> tuple[bytes, dict[str, str]]:
    """Raw little-endian tensor bytes (C order) and the headers that say how to read them:
    uint8 is round(255 y), float16 is y to half precision."""
    if answer == "uint8":
        data = np.rint(samples * 255).astype(np.uint8)
    else:
        data = samples.astype("<f2")
    return data.tobytes(), {"X-VCE-Shape": ",".join(map(str, data.shape)), "X-VCE-Dtype": answer}
