"""Production controls of `vce serve`, as one plain ASGI middleware in front of the app (SECURITY.md
says what each defends against): a bearer token, a request ID echoed and logged, one JSON access
log line per request, a limit on requests in flight (503 with Retry-After; the health probes are
always answered). CORS is Starlette's own middleware, added by create_app when origins are
allowed; the queue limit is the batcher's max_queue; uvicorn's limit_concurrency is the backstop.
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

    def __init__(self, app, token: str | None = None, log_requests: bool = False, max_in_flight: int | None = None):
        self.app, self.log_requests, self.max_in_flight, self.in_flight = app, log_requests, max_in_flight, 0
        if log_requests and not access_log.handlers:  # in every worker process: stderr, one JSON object a line
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            access_log.addHandler(handler)
            access_log.setLevel(logging.INFO)
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

        probe = scope["path"] in OPEN_PATHS
        if self.expected is not None and not probe and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.expected):
            await refuse(scope["path"], send_with_id, 401, "unauthorized", "expected a valid bearer token",
                         (b"www-authenticate", b"Bearer"))
        elif self.max_in_flight is not None and not probe and self.in_flight >= self.max_in_flight:
            await refuse(scope["path"], send_with_id, 503, "overloaded",
                         f"expected at most {self.max_in_flight} requests in flight; retry shortly",
                         (b"retry-after", b"1"))
        else:
            self.in_flight += 1  # one event loop per process: no lock needed
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self.in_flight -= 1
        if self.log_requests:
            client = scope.get("client") or ("", 0)
            access_log.info(json.dumps({"ts": round(time.time(), 3), "request_id": request_id.decode(),
                                        "method": scope["method"], "path": scope["path"], "status": status[0],
                                        "ms": round((time.perf_counter() - started) * 1000, 2),
                                        "client": client[0]}))


async def refuse(path: str, send, status: int, code: str, message: str, header: tuple[bytes, bytes]) -> None:
    """A refusal in the route family's error shape. A 401 says nothing about why (no hint whether a
    token was sent, close or wrong)."""
    body = {"error": message} if path.startswith("/v2") else {
        "error": {"status": status, "code": code, "message": message}}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            header]})
    await send({"type": "http.response.body", "body": data})
