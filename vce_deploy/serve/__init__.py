"""`vce serve`: the runtime over HTTP (docs/serving.md). fastapi and uvicorn are imported only
when an app is built: `pip install 'vce-deploy[serve]'`."""
from __future__ import annotations

from .requests import ApiError, ServeSettings


def create_app(converter, settings: ServeSettings | None = None):
    from .app import create_app as build

    return build(converter, settings)


def serve(converter, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout_s: float = 30.0) -> None:
    """Run the app on uvicorn until SIGINT/SIGTERM; requests in flight are finished first."""
    try:
        import uvicorn
    except ImportError as err:
        from ..errors import BackendError

        raise BackendError("vce serve needs fastapi and uvicorn: pip install 'vce-deploy[serve]'") from err
    app = create_app(converter, settings)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=graceful_timeout_s,
                limit_concurrency=settings.max_queue + 64)  # past it uvicorn answers 503 before reading


__all__ = ["ApiError", "ServeSettings", "create_app", "serve"]
