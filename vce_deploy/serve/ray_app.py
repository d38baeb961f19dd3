"""Scale-out: the same runtime as a Ray Serve deployment (docs/serving.md, "Ray Serve").

Ray Serve does the batching here: `@serve.batch` collects concurrent requests on each replica
(max batch counted in engine rows through batch_size_fn, as `vce serve --max-batch` counts
them) and hands the list to `convert_merged`, the same function the in-process Batcher runs.
Replicas and CPUs per replica are options; Ray places the replicas on the cluster's nodes.

    vce serve --ray --replicas 4 --cpus-per-replica 2                   # a local one-node cluster
    ray start --head                                                    # multi-node: on the head,
    ray start --address HEAD_IP:6379                                    # on every other node,
    vce serve --ray --ray-address auto --replicas 8 --host 0.0.0.0      # then from the head
"""
from __future__ import annotations

import time
from typing import Any

from ..batching import ConvertRequest, convert_merged
from ..errors import InputError
from .requests import (TENSOR_TYPES, ApiError, ServeSettings, checked_request, json_answer, media_type, options,
                       parse_plain, png_grid, tensor_answer)


def build_app(bundle: str | None, load: dict[str, Any], settings: ServeSettings, replicas: int = 1,
              cpus_per_replica: float = 1.0):
    """The Ray Serve application (not yet running): `serve.run(build_app(...))`."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    max_rows = max(settings.max_batch, 1)

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=max(settings.max_queue, max_rows))
    class VCEConverter:
        def __init__(self):
            from ..converter import Converter

            threads = load.get("threads") or max(1, int(cpus_per_replica))  # what Ray reserved, not the whole node
            self.converter = Converter.load(bundle, **{**load, "threads": threads})

        @serve.batch(max_batch_size=max_rows, batch_wait_timeout_s=settings.max_wait_ms / 1000.0,
                     batch_size_fn=lambda requests: sum(r.rows for r in requests))
        async def convert_batch(self, requests: list[ConvertRequest]) -> list:
            answers = convert_merged(self.converter, requests)
            return [(answer, len(requests)) for answer in answers]  # the batch size travels with each answer

        async def __call__(self, request: Request) -> Response:
            started = time.perf_counter()
            try:
                body = await request.body()
                if len(body) > settings.max_body_bytes:
                    raise ApiError(413, "body_too_large", f"expected a body of at most {settings.max_body_bytes} "
                                                          f"bytes, got {len(body)}")
                fields, images = parse_plain(media_type(request.headers.get("content-type")), body,
                                             dict(request.query_params), ("image",), settings)
                opts = options(fields, request.headers.get("accept"), settings)
                checked = checked_request(self.converter, images["image"], opts)
                samples, merged = await self.convert_batch(checked)
            except ApiError as err:
                return JSONResponse(err.body(), err.status)
            except InputError as err:
                return JSONResponse(ApiError(400, "bad_input", str(err)).body(), 400)
            ms = (time.perf_counter() - started) * 1000
            loaded = self.converter.backend_info
            info = {"backend": loaded.name, "device": loaded.device,
                    "precision": self.converter.precision, "batch_requests": merged, "time_ms": round(ms, 3)}
            if opts.answer == "png":
                return Response(png_grid(checked.conditions, samples), media_type="image/png")
            if opts.answer in TENSOR_TYPES:
                data, headers = tensor_answer(samples, opts.answer)
                return Response(data, media_type="application/octet-stream", headers=headers)
            return Response(json_answer(samples, opts, info), media_type="application/json")

    return VCEConverter.bind()


def run_ray(bundle: str | None, load: dict[str, Any], settings: ServeSettings, host: str = "127.0.0.1",
            port: int = 8000, replicas: int = 1, cpus_per_replica: float = 1.0, address: str | None = None) -> None:
    """Start (or join, with address) a Ray cluster, deploy, and serve POST / until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError as err:
        from ..errors import BackendError

        raise BackendError("vce serve --ray needs Ray Serve: pip install 'vce-deploy[ray]'") from err
    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(bundle, load, settings, replicas, cpus_per_replica), name="vce", route_prefix="/v1/convert")
    print(f"vce serve --ray: POST http://{host}:{port}/v1/convert ({replicas} replicas x {cpus_per_replica:g} CPUs); "
          "Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
