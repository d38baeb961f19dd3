"""`vce serve`: the routes answer what the runtime answers alone, every bad input is a clear
JSON 4xx while others keep being served, and shutdown finishes the requests in flight."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vce_deploy import Converter  # noqa: E402
from vce_deploy.serve import ServeSettings, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JSON_ATOL = 0.5e-4 + 1e-7  # JSON answers are rounded to 4 decimals (serve/requests.py, JSON_DECIMALS)


@pytest.fixture(scope="module")
def converter() -> Converter:
    return Converter.load(backend="onnxruntime", device="cpu", threads=1)


@pytest.fixture(scope="module")
def client(converter):
    settings = ServeSettings(max_batch=64, max_wait_ms=20, max_n=32, max_body_bytes=256 << 10,
                             max_image_pixels=512 * 512)
    with TestClient(create_app(converter, settings)) as test_client:
        yield test_client


def glyph(k: int = 0) -> np.ndarray:
    image = np.full((40, 40), 255, np.uint8)
    image[6:34, 4 + k % 30:10 + k % 30] = 0
    image[6 + k % 25:12 + k % 25, 6:34] = 0
    return image


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header is rewritten to declare width x height (CRC fixed)."""
    data = bytearray(png(np.zeros((1, 1), np.uint8)))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_convert_json_and_png_match_the_runtime_alone(client, converter):
    alone = converter.convert(glyph(1), 3, seed=11)
    answer = client.post("/v1/convert", json={"image": glyph(1).tolist(), "n": 3, "seed": 11})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["seed"] == 11 and body["shape"] == [1, 3, 28, 28] and body["backend"] == "onnxruntime"
    np.testing.assert_allclose(np.array(body["images"], np.float32), alone, atol=JSON_ATOL)
    uploaded = client.post("/v1/convert?n=3&seed=11", content=png(glyph(1)), headers={"Content-Type": "image/png"})
    np.testing.assert_allclose(np.array(uploaded.json()["images"], np.float32), alone, atol=JSON_ATOL)
    assert uploaded.headers["X-VCE-Seed"] == "11" and float(uploaded.headers["X-VCE-Time-Ms"]) > 0
    form = client.post("/v1/convert", files={"image": ("g.png", png(glyph(1)), "image/png")},
                       data={"n": "3", "seed": "11"})
    np.testing.assert_allclose(np.array(form.json()["images"], np.float32), alone, atol=JSON_ATOL)
    grid = client.post("/v1/convert?n=3&seed=11&format=png", content=png(glyph(1)),
                       headers={"Content-Type": "image/png"})
    assert grid.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(grid.content))
    assert image.size == (2 * (4 * 30 + 2), 2 * 32)  # 1 condition + 3 samples of 28 px, 2 px pads, scale 2


def test_every_entry_point_defaults_to_one_temperature(client, converter):
    """The API, the HTTP answer and the CLI all default to DEFAULT_TEMPERATURE, not the prior's 1."""
    import inspect

    from vce_deploy import DEFAULT_TEMPERATURE, Converter
    from vce_deploy.cli import build_parser

    default = converter.convert(glyph(1), 2, seed=4)
    np.testing.assert_array_equal(default, converter.convert(glyph(1), 2, seed=4, temperature=DEFAULT_TEMPERATURE))
    assert not np.allclose(default, converter.convert(glyph(1), 2, seed=4, temperature=1.0))
    body = client.post("/v1/convert", json={"image": glyph(1).tolist(), "n": 2, "seed": 4}).json()
    assert body["temperature"] == DEFAULT_TEMPERATURE
    np.testing.assert_allclose(np.array(body["images"], np.float32), default, atol=JSON_ATOL)
    assert build_parser().parse_args(["convert", "g.png"]).temperature == DEFAULT_TEMPERATURE
    assert inspect.signature(Converter.convert_iter).parameters["temperature"].default == DEFAULT_TEMPERATURE
    page = client.get("/").text  # the drawing page's field starts there too (tests/test_browser.py compares pixels)
    assert f'id="temperature" type="number" min="0.05" max="3" step="0.05" value="{DEFAULT_TEMPERATURE:g}"' in page


def test_seed_is_chosen_and_reported_when_absent(client, converter):
    body = client.post("/v1/convert", json={"image": glyph(2).tolist(), "n": 2}).json()
    np.testing.assert_allclose(np.array(body["images"], np.float32), converter.convert(glyph(2), 2, seed=body["seed"]),
                               atol=JSON_ATOL)


def test_transfer(client, converter):
    x, q, targets = glyph(3), glyph(4), [glyph(5), glyph(6)]
    alone = converter.transfer(x, q, targets, n=2, seed=5)
    answer = client.post("/v1/transfer", json={"x": x.tolist(), "q": q.tolist(),
                                               "targets": [t.tolist() for t in targets], "n": 2, "seed": 5})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(np.array(answer.json()["images"], np.float32), alone, atol=JSON_ATOL)


def test_concurrent_requests_are_merged_and_not_mixed_up(client, converter):
    def ask(k):
        reply = client.post("/v1/convert", json={"image": glyph(k).tolist(), "n": 1, "seed": 100 + k})
        return np.array(reply.json()["images"], np.float32)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for k, got in enumerate(answers):
        np.testing.assert_allclose(got, converter.convert(glyph(k), 1, seed=100 + k), atol=JSON_ATOL)
    text = client.get("/metrics").text
    counts = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("vce_batch_requests_")}
    assert counts["vce_batch_requests_sum"] > counts["vce_batch_requests_count"]  # some batch held >1 request


def test_health_ready_metrics_docs_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["max_batch"] == 64
    client.post("/v1/convert", content=b"", headers={"Content-Type": "image/png"})
    metrics = client.get("/metrics").text
    for name in ("vce_requests_total", "vce_errors_total", "vce_request_seconds_bucket", "vce_batch_rows_bucket",
                 "vce_queue_depth", 'code="empty_body"'):
        assert name in metrics, name
    schema = client.get("/openapi.json").json()
    assert "/v1/convert" in schema["paths"] and "image/png" in json.dumps(schema["paths"]["/v1/convert"])
    assert "swagger" in client.get("/docs").text.lower()
    page = client.get("/")
    assert page.status_code == 200 and 'id="pad"' in page.text
    assert "fetch(`/v1/convert" in client.get("/static/app.js").text


BAD = {
    "not an image": (b"hello, not a PNG", "image/png", "", 400, "not_an_image"),
    "truncated PNG": (png(glyph(0))[:60], "image/png", "", 400, "bad_input"),
    "decompression bomb": (bomb_png(40000, 40000), "image/png", "", 413, "image_too_large"),
    "empty body": (b"", "image/png", "", 400, "empty_body"),
    "n = 0": (png(glyph(0)), "image/png", "?n=0", 400, "bad_parameter"),
    "n huge": (png(glyph(0)), "image/png", "?n=100000", 400, "bad_parameter"),
    "seed not an integer": (png(glyph(0)), "image/png", "?seed=1.5", 400, "bad_parameter"),
    "seed a word": (b'{"image": [[0, 1], [1, 0]], "seed": "abc"}', "application/json", "", 400, "bad_parameter"),
    "wrong content type": (png(glyph(0)), "text/plain", "", 415, "unsupported_media_type"),
    "no content type": (png(glyph(0)), "", "", 415, "unsupported_media_type"),
    "body too large": (b"\x89PNG" + bytes(300 << 10), "image/png", "", 413, "body_too_large"),
    "JSON not an object": (b"[1, 2]", "application/json", "", 400, "bad_json"),
    "JSON broken": (b'{"image": [[0, 1]', "application/json", "", 400, "bad_json"),
    "ragged array": (b'{"image": [[0, 1], [1]]}', "application/json", "", 400, "bad_image"),
    "array out of range": (b'{"image": [[0, 300], [1, 0]]}', "application/json", "", 400, "bad_image"),
    "temperature not a number": (png(glyph(0)), "image/png", "?temperature=hot", 400, "bad_parameter"),
    "temperature zero": (png(glyph(0)), "image/png", "?temperature=0", 400, "bad_input"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_clear_json_4xx_and_others_are_served(client, converter, case):
    body, content_type, query, status, code = BAD[case]
    headers = {"Content-Type": content_type} if content_type else {}
    reply = client.post(f"/v1/convert{query}", content=body, headers=headers)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["status"] == status and "expected" in error["message"], error
    good = client.post("/v1/convert", json={"image": glyph(0).tolist(), "n": 1, "seed": 0})
    assert good.status_code == 200


# -- a real uvicorn: slow clients and graceful shutdown ------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def live_server(converter):
    import uvicorn

    port = free_port()
    settings = ServeSettings(max_wait_ms=2, body_timeout_s=3.0)
    server = uvicorn.Server(uvicorn.Config(create_app(converter, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_ready(port)
    yield port
    server.should_exit = True
    thread.join(10)


def wait_ready(port: int, limit_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server on port {port} not ready within {limit_s} s")


def test_slow_client_gets_408_while_others_are_served(live_server, converter):
    import httpx

    with socket.create_connection(("127.0.0.1", live_server)) as slow:
        slow.sendall(b"POST /v1/convert HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
                     + png(glyph(0))[:20])  # ...and nothing more
        started = time.monotonic()
        good = httpx.post(f"http://127.0.0.1:{live_server}/v1/convert", json={"image": glyph(1).tolist(), "seed": 3})
        assert good.status_code == 200
        if time.monotonic() - started < 2.5:  # answered while the slow one still held its connection open
            slow.setblocking(False)
            with pytest.raises(BlockingIOError):
                slow.recv(1)  # nothing for the slow client yet: its body timeout has not passed
            slow.setblocking(True)
        slow.settimeout(15)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = slow.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"


def test_sigterm_finishes_requests_in_flight(tmp_path):
    """`vce serve` with a long batch wait: a request is in the queue when SIGTERM comes; it is
    answered (200), then the process exits without a traceback."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "vce_deploy", "serve", "--port", str(port), "--backend",
                                "onnxruntime", "--threads", "1", "--max-wait-ms", "1500"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(port)
        result = {}

        def ask():
            result["reply"] = httpx.post(f"http://127.0.0.1:{port}/v1/convert",
                                         json={"image": glyph(0).tolist(), "seed": 1}, timeout=30)

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(0.5)  # the request is now waiting for its batch to fill
        process.send_signal(signal.SIGTERM)
        asker.join(30)
        assert result["reply"].status_code == 200, result["reply"].text
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit is "killed by SIGTERM"
        assert process.wait(30) in (0, -signal.SIGTERM)
        assert b"Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_cli_refuses_bad_settings(capsys):
    from vce_deploy.cli import main

    assert main(["serve", "--max-batch", "-1"]) == 2
    assert "expected --max-batch >= 0" in capsys.readouterr().err


def test_an_engine_failure_is_a_json_500_and_the_server_goes_on(converter):
    settings = ServeSettings(max_batch=0)  # unbatched: the failure happens in the request's own call
    app = create_app(converter, settings)
    with TestClient(app) as test_client:
        backend = converter.backend
        original = backend.run_chunked
        try:
            backend.run_chunked = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))
            failed = test_client.post("/v1/convert", json={"image": glyph(0).tolist(), "seed": 0})
        finally:
            backend.run_chunked = original
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal"
        assert test_client.post("/v1/convert", json={"image": glyph(0).tolist(), "seed": 0}).status_code == 200
        assert 'code="internal"' in test_client.get("/metrics").text
