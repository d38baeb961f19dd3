"""`create_app(converter, settings)`: the HTTP face of the runtime (docs/serving.md).

Routes are thin: read the body within its limits, parse (serve/requests.py), call the
runtime, encode. Every refusal is an ApiError turned into one JSON shape in `_answer`; the
batcher and the readiness flag live in the app's lifespan, so uvicorn's graceful shutdown
(stop accepting, finish what is in flight, then the lifespan's exit) drains the queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from importlib import resources
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request  # this module is imported only to build an app: fastapi is there
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest
from starlette.staticfiles import StaticFiles

from ..batching import Batcher, ConvertRequest, convert_merged
from ..errors import InputError, OverloadedError, RequestTimeoutError
from ..inputs import DEFAULT_TEMPERATURE, preprocess_batch
from ..preprocess import preprocess
from . import oip
from .controls import Controls
from .metrics import ServeMetrics
from .requests import (IMAGE_TYPES, TENSOR_TYPES, ApiError, Options, ServeSettings, checked_request,
                       image_from_bytes, json_answer, media_type, options, parse_plain, png_grid, tensor_answer,
                       unsupported)

log = logging.getLogger("vce_deploy.serve")
CONVERT_DOC = """n variations of each posted glyph.

Send the glyph as a raw image body (`Content-Type: image/png`, parameters in the query
string), as `multipart/form-data` (file field `image`, repeatable; fields n, seed,
temperature), or as JSON `{"image": [[...]]}` / `{"images": [...]}` with n, seed and
temperature beside it. Answer: JSON arrays rounded to 4 decimals (default), or with
`Accept: image/png` (or `format=png`) one PNG grid with each condition first in its row, or with
`Accept: application/octet-stream` (or `format=float16` / `format=uint8`) the raw tensor bytes,
shape and dtype in the `X-VCE-Shape` and `X-VCE-Dtype` headers.
"""
BODY_SCHEMA = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "n": {"type": "integer", "minimum": 1}, "seed": {"type": "integer", "minimum": 0},
        "temperature": {"type": "number"},
        "format": {"type": "string", "enum": ["json", "png", "float16", "uint8"]}}}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"}}}}}}}


async def read_body(receive_stream, declared: str | None, settings: ServeSettings) -> bytes:
    """The whole body, refusing (413) more than max_body_bytes and (408) a client that has not
    sent it all within body_timeout_s: one slow client holds only its own connection."""
    limit = settings.max_body_bytes
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_content_length", f"Content-Length: expected an integer, got {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"expected a body of at most {limit} bytes, "
                                                  f"Content-Length says {declared}")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in receive_stream:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"expected a body of at most {limit} bytes, got more")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), settings.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"expected the whole request body within {settings.body_timeout_s:g} s; "
                                            "the client stopped sending") from None


def create_app(converter, settings: ServeSettings | None = None):
    """The ASGI app serving `converter` (loaded by the caller) with `settings` (limits, batching)."""
    settings = settings or ServeSettings()
    state: dict[str, Any] = {"batcher": None, "ready": False}
    metrics = ServeMetrics(lambda: state["batcher"].depth if state["batcher"] else 0)
    loaded = converter.backend_info
    info = {"backend": loaded.name, "device": loaded.device,
            "precision": converter.precision, "batching": settings.max_batch > 0}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if settings.max_batch > 0:
            state["batcher"] = Batcher(converter, settings.max_batch, settings.max_wait_ms, settings.max_queue,
                                       timeout=settings.request_timeout_s, on_batch=metrics.on_batch)
        converter.convert(np.eye(28, dtype=np.float32), 1, seed=0)  # warm the engine before /readyz says so (a stroke: blank is refused)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            if state["batcher"] is not None:  # uvicorn has finished the requests in flight: drain the rest
                await asyncio.get_running_loop().run_in_executor(None, state["batcher"].close)

    app = FastAPI(title="vce serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="One-shot glyph conversion with a VCE bundle: docs/serving.md")

    def refusal(err: Exception, route: str) -> ApiError:
        """Every failure a route can meet, as the ApiError it is answered with."""
        if isinstance(err, ApiError):
            return err
        if isinstance(err, InputError):
            return ApiError(400, "bad_input", str(err))
        if isinstance(err, OverloadedError):
            return ApiError(503, "overloaded", str(err), headers={"Retry-After": "1"})
        if isinstance(err, RequestTimeoutError):
            return ApiError(504, "timeout", str(err))
        if isinstance(err, ClientDisconnect):
            return ApiError(400, "client_disconnected", "expected a whole request body, the client disconnected")
        log.exception("%s failed", route)  # an engine failure: logged, answered as JSON, the server goes on
        return ApiError(500, "internal", f"the server failed on this request ({type(err).__name__}); see its log")

    async def answer(route: str, request: Request, handle: Callable[[bytes], Awaitable[Response]]) -> Response:
        """Every route's one wrapper: body limits, errors as JSON (the /v2 protocol's own shape on
        /v2 routes, the same status), metrics."""
        start = time.perf_counter()
        metrics.in_flight.inc()
        try:
            body = await read_body(request.stream(), request.headers.get("content-length"), settings)
            response = await handle(body)
        except Exception as caught:
            err = refusal(caught, route)
            content = {"error": err.message} if route.startswith("v2") else err.body()
            response = JSONResponse(content, err.status, headers=err.headers)
            metrics.errors.labels(route, err.code).inc()
        finally:
            metrics.in_flight.dec()
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    async def parse(body: bytes, request: Request, image_keys: tuple[str, ...]) -> tuple[dict, dict[str, list]]:
        """(the option fields, the images under each key) from any of the accepted body types."""
        kind = media_type(request.headers.get("content-type"))
        fields: dict[str, Any] = dict(request.query_params)
        if kind == "multipart/form-data":
            replay = StarletteRequest(request.scope, _replay(body))
            try:
                form = await replay.form(max_files=settings.max_images * len(image_keys), max_fields=16)
            except Exception as err:  # python-multipart's parse errors, Starlette's limits
                raise ApiError(400, "bad_multipart", f"expected a multipart/form-data body, got: {err}") from None
            fields.update({k: v for k, v in form.items() if isinstance(v, str)})
            images = {}
            for key in image_keys:
                files = [item for item in form.getlist(key) if not isinstance(item, str)]
                if not files:
                    raise ApiError(400, "bad_image", f"expected a file field {key!r} in the form, got fields "
                                                     f"{sorted(set(form.keys()))}")
                if len(files) > settings.max_images:
                    raise ApiError(413, "too_many_images", f"{key}: expected at most {settings.max_images} files")
                images[key] = [await decode(await f.read(), f"{key} ({f.filename})") for f in files]
            return fields, images
        if kind in IMAGE_TYPES and len(image_keys) == 1:
            return fields, {image_keys[0]: [await decode(body, "body")]}
        if kind == "application/json":
            return parse_plain(kind, body, fields, image_keys, settings)
        raise unsupported(kind, image_keys, multipart=True)

    async def decode(data: bytes, what: str):
        """Header checked here; small images are left as bytes (decoded during preprocessing,
        inline), large ones decoded in a thread so the event loop keeps serving."""
        data, pixels = image_from_bytes(data, what, settings)
        if pixels <= settings.inline_decode_pixels:
            return data
        try:
            return await asyncio.get_running_loop().run_in_executor(None, preprocess, data, what)
        except InputError as err:
            raise ApiError(400, "bad_image", str(err)) from None

    def encode(samples: np.ndarray, conditions: np.ndarray, opts: Options, started: float) -> Response:
        ms = (time.perf_counter() - started) * 1000
        headers = {"X-VCE-Seed": str(opts.seed), "X-VCE-Backend": f"{info['backend']} {info['precision']}",
                   "X-VCE-Time-Ms": f"{ms:.2f}"}
        if opts.answer == "png":
            return Response(png_grid(conditions, samples), media_type="image/png", headers=headers)
        if opts.answer in TENSOR_TYPES:
            data, shape = tensor_answer(samples, opts.answer)
            return Response(data, media_type="application/octet-stream", headers={**headers, **shape})
        return Response(json_answer(samples, opts, {**info, "time_ms": round(ms, 3)}), media_type="application/json",
                        headers=headers)

    async def run_convert(request: ConvertRequest) -> np.ndarray:
        if state["batcher"] is not None:
            return await state["batcher"].convert_request_async(request)
        return (await run_in_threadpool(convert_merged, converter, [request]))[0]  # alone: a batch of one

    @app.post("/v1/convert", summary="n variations of each glyph", description=CONVERT_DOC, openapi_extra=BODY_SCHEMA)
    async def convert(request: Request):
        async def handle(body: bytes) -> Response:
            started = time.perf_counter()
            fields, images = await parse(body, request, ("image",))
            opts = options(fields, request.headers.get("accept"), settings)
            checked = checked_request(converter, images["image"], opts)
            return encode(await run_convert(checked), checked.conditions, opts, started)

        return await answer("convert", request, handle)

    @app.post("/v1/transfer", summary="the rules that turn q into x, applied to other glyphs",
              description="JSON {x, q, targets: [...], n, seed, temperature} or multipart files x, q, target "
                          "(repeatable). Not batched across requests: it runs the encoder first.")
    async def transfer(request: Request):
        async def handle(body: bytes) -> Response:
            started = time.perf_counter()
            fields, images = await parse(body, request, ("x", "q", "target"))
            opts = options(fields, request.headers.get("accept"), settings)
            targets = images["target"]
            samples = await run_in_threadpool(converter.transfer, images["x"][:1], images["q"][:1], targets,
                                              n=opts.n, seed=opts.seed, temperature=opts.temperature)
            return encode(samples, preprocess_batch(targets, "targets"), opts, started)

        return await answer("transfer", request, handle)

    @app.get("/healthz", summary="the process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="the engine is loaded and warm, and not shutting down")
    async def readyz():
        if not state["ready"]:
            return JSONResponse({"status": "not ready"}, 503)
        return {"status": "ready", **info, "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_page():
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    add_v2_routes(app, converter, settings, info, state, answer, run_convert)
    add_offline_docs(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        # the page's temperature field starts at the API's own default, so what the page shows
        # is what a client that names no temperature gets (vce_deploy/inputs.py)
        html = (resources.files(__package__) / "static" / "index.html").read_text()
        return HTMLResponse(html.replace("{{DEFAULT_TEMPERATURE}}", f"{DEFAULT_TEMPERATURE:g}"))

    app.mount("/static", StaticFiles(packages=[(__package__, "static")]), name="static")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.serving = state
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID",
                                          "Inference-Header-Content-Length"],
                           expose_headers=["X-Request-ID", "X-VCE-Seed", "X-VCE-Shape", "X-VCE-Dtype",
                                           "Inference-Header-Content-Length"])
    if settings.token is None and not settings.access_log and settings.max_connections is None:
        return app
    return Controls(app, settings.token, settings.access_log, settings.max_connections)


def add_v2_routes(app, converter, settings: ServeSettings, info: dict, state: dict, answer, run_convert) -> None:
    """The Open Inference Protocol (serve/oip.py) over the same runtime, batcher and limits as /v1."""
    def ready() -> JSONResponse:  # the probes answer no body, only the status
        return JSONResponse({}, 200 if state["ready"] else 503)

    @app.get("/v2", summary="Open Inference Protocol: server metadata")
    async def v2_server():
        return {"name": "vce serve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="Open Inference Protocol: the process is up")
    async def v2_live():
        return JSONResponse({}, 200)

    @app.get("/v2/health/ready", summary="Open Inference Protocol: the engine is warm")
    async def v2_ready():
        return ready()

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        @app.get(prefix, summary="Open Inference Protocol: model metadata (from vce_deploy/contract.py)")
        async def v2_model(name: str, version: str | None = None):
            try:
                oip.check_model(name, version)
            except ApiError as err:
                return JSONResponse({"error": err.message}, err.status)
            return oip.model_metadata(converter.image_size, info)

        @app.get(prefix + "/ready", summary="Open Inference Protocol: the model is ready")
        async def v2_model_ready(name: str, version: str | None = None):
            try:
                oip.check_model(name, version)
            except ApiError as err:
                return JSONResponse({"error": err.message}, err.status)
            return ready()

        @app.post(prefix + "/infer", summary="Open Inference Protocol: n variations of each glyph in q")
        async def v2_infer(name: str, request: Request, version: str | None = None):
            async def handle(body: bytes) -> Response:
                oip.check_model(name, version)
                parsed = oip.parse_infer(body, request.headers.get(oip.HEADER_LENGTH), settings)
                opts = options(parsed.fields, None, settings)
                samples = await run_convert(checked_request(converter, parsed.images, opts))
                data, headers = oip.infer_answer(samples, parsed, opts.seed)
                return Response(data, headers=headers)

            return await answer("v2_infer", request, handle)


def add_offline_docs(app) -> None:
    """/docs from Swagger UI's files in the swagger-ui-bundle package, served by this app: the page
    names no CDN, so it works on a box with no network (issue 22)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the serve extra brings it; without it /docs is absent rather than blank
        return
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="vce serve: API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from validator.swagger.io


def _replay(body: bytes):
    """An ASGI receive that hands out a body already read (so Starlette can parse the form)."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
