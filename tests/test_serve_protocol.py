"""`vce serve`'s lean answers (binary by content negotiation, rounded JSON), the Open Inference
Protocol (/v2, checked with tritonclient against a real `vce serve`), the production controls
(token, CORS, X-Request-ID, access log) and the offline /docs page."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import JSON_ATOL, ROOT, free_port, glyph, png, wait_ready  # noqa: E402

from vce_deploy import Converter  # noqa: E402
from vce_deploy.contract import MODEL_IO  # noqa: E402
from vce_deploy.serve import ServeSettings, create_app  # noqa: E402

TOKEN = "t0ken-for-the-tests-only-0123456789"


@pytest.fixture(scope="module")
def converter() -> Converter:
    return Converter.load(backend="onnxruntime", device="cpu", threads=1)


@pytest.fixture(scope="module")
def client(converter):
    settings = ServeSettings(max_wait_ms=2, max_n=16, max_images=4, max_image_pixels=256 * 256)
    with TestClient(create_app(converter, settings)) as test_client:
        yield test_client


def post_png(client, query: str, accept: str | None = None):
    headers = {"Content-Type": "image/png", **({"Accept": accept} if accept else {})}
    return client.post(f"/v1/convert{query}", content=png(glyph(1)), headers=headers)


# -- /v1 answers -----------------------------------------------------------------------------------


def test_binary_answers_by_content_negotiation(client, converter):
    alone = converter.convert(glyph(1), 3, seed=7)  # (1, 3, 28, 28)
    half = post_png(client, "?n=3&seed=7", "application/octet-stream")
    assert half.headers["content-type"] == "application/octet-stream"
    assert half.headers["X-VCE-Shape"] == "1,3,28,28" and half.headers["X-VCE-Dtype"] == "float16"
    got = np.frombuffer(half.content, "<f2").reshape(1, 3, 28, 28)
    np.testing.assert_allclose(got.astype(np.float32), alone, atol=1e-3)
    grey = post_png(client, "?n=3&seed=7&format=uint8", "application/octet-stream")
    assert grey.headers["X-VCE-Dtype"] == "uint8" and len(grey.content) == 3 * 28 * 28
    np.testing.assert_array_equal(np.frombuffer(grey.content, np.uint8).reshape(alone.shape),
                                  np.rint(alone * 255).astype(np.uint8))
    assert post_png(client, "?n=3&seed=7", "image/png").headers["content-type"] == "image/png"
    both = post_png(client, "?n=3&seed=7", "application/json, application/octet-stream")
    assert both.headers["content-type"] == "application/json"  # JSON when the client takes it


def test_json_answer_is_rounded_and_small(client, converter):
    reply = post_png(client, "?n=1&seed=3")
    assert len(reply.content) < 8000, len(reply.content)  # full-precision floats made 16 KB
    numbers = re.findall(rb"\d\.\d+(?:e-?\d+)?", reply.content.split(b'"images":', 1)[1])
    assert numbers and all(len(x.split(b".")[1]) <= 4 for x in numbers if b"e" not in x)
    np.testing.assert_allclose(np.array(reply.json()["images"], np.float32), converter.convert(glyph(1), 1, seed=3),
                               atol=JSON_ATOL)


# -- /v2: the Open Inference Protocol ----------------------------------------------------------------


def test_v2_health_and_metadata_from_the_contract(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    meta = client.get("/v2/models/vce").json()
    assert [i["name"] for i in meta["inputs"]] == ["q"] and "q" in MODEL_IO["convertor"].inputs
    assert [o["name"] for o in meta["outputs"]] == list(MODEL_IO["convertor"].outputs)
    assert meta["outputs"][0]["shape"][-2:] == [28, 28]
    assert client.get("/v2/models/vce/ready").status_code == 200
    assert client.get("/v2/models/vce/versions/1/ready").status_code == 200
    missing = client.get("/v2/models/other")
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)


def infer_json(images: np.ndarray, **parameters) -> dict:
    return {"id": "r1", "parameters": parameters,
            "inputs": [{"name": "q", "datatype": "UINT8", "shape": list(images.shape), "data": images.ravel().tolist()}]}


def test_v2_infer_json_and_binary_equal_the_runtime(client, converter):
    images = np.stack([glyph(2), glyph(3)])  # (2, 40, 40) uint8
    alone = converter.convert(list(images), 2, seed=9)  # (2, 2, 28, 28)
    reply = client.post("/v2/models/vce/infer", json=infer_json(images, n=2, seed=9))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["id"] == "r1" and body["outputs"][0]["shape"] == [2, 2, 28, 28]
    np.testing.assert_array_equal(np.array(body["outputs"][0]["data"], np.float32).reshape(alone.shape), alone)
    # the binary extension: JSON header, then q's bytes (FP32 this time); y asked back in binary
    floats = (images < 128).astype("<f4")  # strokes 1, on 0: the polarity preprocess also reads
    header = json.dumps({"parameters": {"n": 2, "seed": 9}, "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
                         "inputs": [{"name": "q", "datatype": "FP32", "shape": [2, 40, 40],
                                     "parameters": {"binary_data_size": floats.nbytes}}]}).encode()
    reply = client.post("/v2/models/vce/infer", content=header + floats.tobytes(),
                        headers={"Inference-Header-Content-Length": str(len(header)),
                                 "Content-Type": "application/octet-stream"})
    assert reply.status_code == 200, reply.text
    split = int(reply.headers["Inference-Header-Content-Length"])
    meta = json.loads(reply.content[:split])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == alone.nbytes
    expected = converter.convert(list(floats), 2, seed=9)
    np.testing.assert_array_equal(np.frombuffer(reply.content[split:], "<f4").reshape(expected.shape), expected)


def binary_request(shape, dtype: str, data: bytes, size: int | None = None) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "q", "datatype": dtype, "shape": shape,
                                     "parameters": {"binary_data_size": len(data) if size is None else size}}]})
    return header.encode() + data, {"Inference-Header-Content-Length": str(len(header))}


V2_BAD = {  # each: (body, headers, status); the /v1 refusals (n, seed, temperature, size, values) included
    "not JSON": (b"{nope", {}, 400),
    "no inputs": (b'{"inputs": []}', {}, 400),
    "wrong input name": (json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 2, 2],
                                                 "data": [0, 1, 2, 3]}]}).encode(), {}, 400),
    "wrong datatype": (json.dumps({"inputs": [{"name": "q", "datatype": "INT64", "shape": [1, 2, 2],
                                               "data": [0, 1, 2, 3]}]}).encode(), {}, 400),
    "data not the shape": (json.dumps({"inputs": [{"name": "q", "datatype": "UINT8", "shape": [1, 3, 3],
                                                   "data": [0, 1]}]}).encode(), {}, 400),
    "values out of range": (json.dumps({"inputs": [{"name": "q", "datatype": "FP32", "shape": [1, 2, 2],
                                                    "data": [0, 1, 2, 3]}]}).encode(), {}, 400),
    "n = 0": (json.dumps(infer_json(glyph(0)[None], n=0)).encode(), {}, 400),
    "n too large": (json.dumps(infer_json(glyph(0)[None], n=1000)).encode(), {}, 400),
    "seed a word": (json.dumps(infer_json(glyph(0)[None], seed="abc")).encode(), {}, 400),
    "temperature zero": (json.dumps(infer_json(glyph(0)[None], temperature=0)).encode(), {}, 400),
    "unknown parameter": (json.dumps(infer_json(glyph(0)[None], colour="red")).encode(), {}, 400),
    "too many glyphs": (json.dumps(infer_json(np.zeros((5, 4, 4), np.uint8))).encode(), {}, 413),
    "glyph too large": (json.dumps(infer_json(np.zeros((1, 300, 300), np.uint8))).encode(), {}, 413),
    "binary size wrong": (*binary_request([1, 4, 4], "UINT8", bytes(16), size=15), 400),
    "binary bytes short": (*binary_request([1, 4, 4], "UINT8", bytes(10), size=16), 400),
    "header length past the body": (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400),
    "wrong output": (json.dumps({**infer_json(glyph(0)[None]), "outputs": [{"name": "mu"}]}).encode(), {}, 400),
}


@pytest.mark.parametrize("case", sorted(V2_BAD))
def test_v2_refuses_with_the_protocol_error_json(client, case):
    body, headers, status = V2_BAD[case]
    reply = client.post("/v2/models/vce/infer", content=body, headers={"Content-Type": "application/json", **headers})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert isinstance(error, str) and "expected" in error, error


# -- production controls ---------------------------------------------------------------------------


def test_token_request_id_cors_and_access_log(converter, caplog):
    settings = ServeSettings(max_batch=0, token=TOKEN, cors_origins=("https://draw.example",), access_log=True)
    with TestClient(create_app(converter, settings)) as guarded, caplog.at_level(logging.INFO, "vce_deploy.serve.access"):
        body = {"image": glyph(0).tolist(), "seed": 1}
        none = guarded.post("/v1/convert", json=body)
        wrong = guarded.post("/v1/convert", json=body, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"})
        assert none.status_code == wrong.status_code == 401 and none.content == wrong.content
        assert TOKEN not in none.text and "token" in none.json()["error"]["message"]
        assert isinstance(guarded.post("/v2/models/vce/infer", json={}).json()["error"], str)
        assert guarded.get("/healthz").status_code == 200 and guarded.get("/v2/health/ready").status_code == 200
        good = guarded.post("/v1/convert", json=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                                "X-Request-ID": "abc-123", "Origin": "https://draw.example"})
        assert good.status_code == 200 and good.headers["X-Request-ID"] == "abc-123"
        assert good.headers["access-control-allow-origin"] == "https://draw.example"
        other = guarded.get("/healthz", headers={"Origin": "https://evil.example", "X-Request-ID": "bad id\x01"})
        assert "access-control-allow-origin" not in other.headers
        assert re.fullmatch(r"[0-9a-f]{32}", other.headers["X-Request-ID"])  # a tame ID made for it
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "vce_deploy.serve.access"]
    logged = {line["request_id"]: line for line in lines}
    assert logged["abc-123"]["status"] == 200 and logged["abc-123"]["path"] == "/v1/convert"
    assert sorted(line["status"] for line in lines).count(401) >= 3


def test_controls_are_off_by_default(client):
    reply = client.get("/healthz", headers={"Origin": "https://draw.example"})
    assert "access-control-allow-origin" not in reply.headers and reply.status_code == 200
    assert post_png(client, "?seed=1").status_code == 200  # no token asked


def test_docs_page_works_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls  # no CDN: every asset from this app
    for url in urls:
        assert client.get(url).status_code == 200, url


def test_serve_checks_its_extra_before_announcing(monkeypatch, capsys):
    from vce_deploy.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", "--backend", "onnxruntime", "--port", "1"]) == 1
    out = capsys.readouterr()
    assert "http://" not in out.out + out.err and "pip install 'vce-deploy[serve]'" in out.err


# -- tritonclient against a real `vce serve` ---------------------------------------------------------


def test_tritonclient_http_against_vce_serve(tmp_path, converter):
    """Two worker processes (one thread each) behind one port: every answer the same whichever serves it."""
    http = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException
    import httpx

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "vce_deploy", "serve", "--port", str(port), "--backend",
                                "onnxruntime", "--threads", "2", "--workers", "2", "--max-wait-ms", "2",
                                "--token-file", str(token_file), "--access-log"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(port)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        triton = http.InferenceServerClient(f"127.0.0.1:{port}")
        assert triton.is_server_live() and triton.is_server_ready()
        assert triton.is_model_ready("vce", headers=auth)
        assert triton.get_model_metadata("vce", headers=auth)["outputs"][0]["name"] == "y"
        images = np.stack([glyph(4), glyph(5)])
        answers = {}
        for binary in (True, False):
            q = http.InferInput("q", list(images.shape), "UINT8")
            q.set_data_from_numpy(images, binary_data=binary)
            result = triton.infer("vce", [q], outputs=[http.InferRequestedOutput("y", binary_data=binary)],
                                  parameters={"n": 2, "seed": 21},
                                  headers=dict(auth))  # infer() writes its header length into the dict it gets
            answers[binary] = result.as_numpy("y")
        np.testing.assert_array_equal(answers[True], answers[False])
        v1 = httpx.post(f"http://127.0.0.1:{port}/v1/convert", headers=auth, timeout=30,
                        json={"images": [g.tolist() for g in images], "n": 2, "seed": 21}).json()
        np.testing.assert_allclose(answers[True], np.array(v1["images"], np.float32), atol=JSON_ATOL)
        np.testing.assert_array_equal(answers[True], converter.convert(list(images), 2, seed=21))
        with pytest.raises(InferenceServerException, match="expected"):
            q = http.InferInput("q", [1, 4, 4], "UINT8")
            q.set_data_from_numpy(np.zeros((1, 4, 4), np.uint8))
            triton.infer("vce", [q], parameters={"n": 0}, headers=dict(auth))
        with pytest.raises(InferenceServerException):
            triton.get_model_metadata("vce")  # no token: 401
        for _ in range(4):  # spread over both workers
            q = http.InferInput("q", list(images.shape), "UINT8")
            q.set_data_from_numpy(images)
            again = triton.infer("vce", [q], parameters={"n": 2, "seed": 21}, headers=dict(auth)).as_numpy("y")
            np.testing.assert_array_equal(again, answers[True])
        triton.close()
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    logged = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    assert any(line["path"] == "/v2/models/vce/infer" and line["status"] == 200 for line in logged), output[-2000:]
    assert b"Traceback" not in output



def test_over_the_connection_limit_a_503_with_retry_after_and_others_served(converter):
    from concurrent.futures import ThreadPoolExecutor

    settings = ServeSettings(max_wait_ms=800, max_connections=1)  # one request waits 0.8 s for company
    results = []
    deadline = time.monotonic() + 10

    def client_loop(seed: int) -> None:  # three clients against a limit of one: someone is turned away
        while time.monotonic() < deadline and not any(r.status_code == 503 for r in results):
            results.append(limited.post("/v1/convert", json={"image": glyph(seed % 2).tolist(), "seed": seed}))

    with TestClient(create_app(converter, settings)) as limited, ThreadPoolExecutor(3) as pool:
        list(pool.map(client_loop, (1, 2, 3)))
        over = [r for r in results if r.status_code == 503]
        assert over, f"no 503 in {len(results)} answers: {sorted({r.status_code for r in results})}"
        assert over[0].headers["Retry-After"] == "1" and over[0].json()["error"]["code"] == "overloaded"
        assert {r.status_code for r in results} <= {200, 503}, "the others are served, never failed"
        assert limited.get("/readyz").status_code == 200  # probes are answered over the limit
        assert limited.post("/v1/convert", json={"image": glyph(1).tolist(), "seed": 2}).status_code == 200


def test_not_ready_until_the_lifespan_has_warmed_the_engine(converter):
    cold = TestClient(create_app(converter, ServeSettings()))  # no `with`: the lifespan (warm-up) has not run
    assert cold.get("/readyz").status_code == 503 and cold.get("/v2/health/ready").status_code == 503
    assert cold.get("/v2/models/vce/ready").status_code == 503 and cold.get("/v2/health/live").status_code == 200
