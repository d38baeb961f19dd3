"""Production controls of `vce serve`, as one plain ASGI middleware in front of the app (SECURITY.md
says what each defends against): a bearer token, a request ID echoed and logged, one JSON access
log line per request. CORS is Starlette's own middleware, added by create_app when origins are
allowed; connection and queue limits are uvicorn's limit_concurrency and the batcher's max_queue.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

access_log = logging.getLogger("vce_deploy.serve.access")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})  # probes need no token
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")  # a client's ID is echoed only if it is this tame


class Controls:
    """Token check (constant-time), X-Request-ID, access log; the wrapped app sees only allowed calls."""

    def __init__(self, app, token: str | None = None, log_requests: bool = False):
        self.app, self.log_requests = app, log_requests
        self.expected = None if token is None else b"Bearer " + token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        started, status = time.perf_counter(), [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        if self.expected is not None and scope["path"] not in OPEN_PATHS and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.expected):
            await unauthorized(scope["path"], send_with_id)
        else:
            await self.app(scope, receive, send_with_id)
        if self.log_requests:
            client = scope.get("client") or ("", 0)
            access_log.info(json.dumps({"ts": round(time.time(), 3), "request_id": request_id.decode(),
                                        "method": scope["method"], "path": scope["path"], "status": status[0],
                                        "ms": round((time.perf_counter() - started) * 1000, 2),
                                        "client": client[0]}))


async def unauthorized(path: str, send) -> None:
    """401 with nothing about why (no hint whether a token was sent, close or wrong)."""
    message = "expected a valid bearer token"
    body = {"error": message} if path.startswith("/v2") else {
        "error": {"status": 401, "code": "unauthorized", "message": message}}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": data})
