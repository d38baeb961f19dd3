"""`vce serve`: the runtime over HTTP (docs/serving.md). fastapi and uvicorn are imported only
when an app is built: `pip install 'vce-deploy[serve]'`."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

from .requests import ApiError, ServeSettings

NEEDS = ("fastapi", "uvicorn", "multipart", "prometheus_client")  # the serve extra's imports
WORKER_CONFIG = "VCE_SERVE_WORKER_CONFIG"  # how `serve(workers=N)` tells each worker process what to load


def missing_extra() -> list[str]:
    """The serve extra's modules that are not installed (checked before anything is announced)."""
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def check_extra() -> None:
    missing = missing_extra()
    if missing:
        from ..errors import DependencyError

        raise DependencyError(f"vce serve needs the serve extra (missing: {', '.join(missing)}): "
                              "pip install 'vce-deploy[serve]'")


def create_app(converter, settings: ServeSettings | None = None):
    from .app import create_app as build

    return build(converter, settings)


def serve(converter, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout_s: float = 30.0, workers: int = 1, load: dict | None = None) -> None:
    """Run the app on uvicorn (httptools and uvloop, from uvicorn[standard]) until SIGINT/SIGTERM;
    requests in flight are finished first. With workers > 1, `converter` is None and each worker
    process loads its own Converter from `load` (Converter.load's arguments, threads split)."""
    check_extra()
    import uvicorn

    limits = dict(host=host, port=port, log_level="warning", access_log=False, http="httptools", loop="uvloop",
                  timeout_graceful_shutdown=graceful_timeout_s,
                  limit_concurrency=max(settings.max_connections or 0, settings.max_queue) + 64)  # backstop: 503 unread
    if workers <= 1:
        uvicorn.run(create_app(converter, settings), **limits)
        return
    fields = dataclasses.asdict(settings)
    os.environ[WORKER_CONFIG] = json.dumps({"load": load or {}, "settings": fields})  # inherited by the workers
    uvicorn.run("vce_deploy.serve:worker_app", factory=True, workers=workers, **limits)


def worker_app():
    """One worker process's app (uvicorn's factory): its own Converter, warmed in its lifespan."""
    from ..converter import Converter

    config = json.loads(os.environ[WORKER_CONFIG])
    settings = config["settings"]
    settings["cors_origins"] = tuple(settings["cors_origins"])
    return create_app(Converter.load(**config["load"]), ServeSettings(**settings))


__all__ = ["ApiError", "ServeSettings", "check_extra", "create_app", "serve"]
