"""Load test of `vce serve` on loopback: N concurrent clients for T seconds, batching on and off.

    python scripts/loadtest.py --clients 64 --seconds 20 --rounds 2          # both modes, interleaved
    python scripts/loadtest.py --modes batched --soak-seconds 180            # memory over a soak

Each mode starts its own `vce serve` subprocess (same bundle, backend, precision, threads; only
--max-batch differs: 0 turns batching off, so every request runs alone on the thread pool),
warms it, then runs closed-loop clients: each keeps one request in flight (a PNG glyph, n, its
own seed) and checks every answer against the same seed run alone, computed before the run in
this process. Reported per mode: throughput, p50/p99 latency, the batch-size histogram (from
the server's /metrics), errors, wrong answers (mixed up) and requests never answered (lost),
and the server's RSS sampled every half second. Bounded: loopback only, at most 1024 clients,
600 s per run. The machine is printed (CPU model, load average before and after), since the
numbers mean nothing without it (docs/serving.md, "Load test").
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vce_deploy import Converter  # noqa: E402

POOL = 24  # distinct (glyph, seed) requests per client, cycled


def glyph_png(k: int) -> tuple[bytes, np.ndarray]:
    """A distinct glyph per k: two bars at k-dependent places on a 32x32 light background."""
    rng = np.random.default_rng(k)
    image = np.full((32, 32), 255, np.uint8)
    a, b = rng.integers(2, 24, size=2)
    image[4:28, a:a + 5] = 0
    image[b:b + 5, 4:28] = 0
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue(), image


def prepare(converter: Converter, clients: int, n: int) -> list[list[tuple[bytes, int, np.ndarray]]]:
    """Per client, POOL requests (PNG body, seed, the answer of the same call made alone)."""
    plan = []
    for client in range(clients):
        mine = []
        for i in range(POOL):
            k = client * POOL + i
            body, image = glyph_png(k)
            seed = 10_000 + k
            mine.append((body, seed, converter.convert(image, n, seed=seed)))
        plan.append(mine)
    return plan


async def http_post(reader, writer, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive POST on an open connection: the lightest client Python has."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    return status, await reader.readexactly(length)


async def client(port: int, plan, n: int, stop_at: float, results: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.monotonic() < stop_at:
            body, seed, expected = plan[i % len(plan)]
            i += 1
            started = time.perf_counter()
            results["sent"] += 1
            try:
                status, payload = await asyncio.wait_for(
                    http_post(reader, writer, f"/v1/convert?n={n}&seed={seed}", body, "image/png"), 30)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                results["lost"] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            results["latency"].append(time.perf_counter() - started)
            if status != 200:
                results["errors"][str(status)] = results["errors"].get(str(status), 0) + 1
                continue
            answer = json.loads(payload)
            got = np.asarray(answer["images"], np.float32)
            if answer["seed"] != seed or got.shape != expected.shape or np.abs(got - expected).max() > 1e-4:
                results["mixed_up"] += 1
    finally:
        writer.close()


def metric_buckets(text: str, name: str) -> dict[float, float]:
    found = {}
    for line in text.splitlines():
        match = re.match(rf'{name}_bucket{{le="([^"]+)"}} ([0-9.e+]+)', line)
        if match:
            found[float(match.group(1))] = float(match.group(2))
    return found


def get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return reply.read().decode()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args, max_batch: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "vce_deploy", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--backend", args.backend, "--precision", args.precision, "--max-batch", str(max_batch),
               "--max-wait-ms", str(args.max_wait_ms)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.device:
        command += ["--device", args.device]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            get(port, "/readyz")
            return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready in 120 s")


async def drive(port: int, plan, n: int, seconds: float, pid: int) -> tuple[dict, list]:
    results = {"sent": 0, "lost": 0, "mixed_up": 0, "errors": {}, "latency": []}
    stop_at = time.monotonic() + seconds
    memory = []

    async def sample():
        while time.monotonic() < stop_at:
            memory.append((round(seconds - (stop_at - time.monotonic()), 2), rss_mb(pid)))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(client(port, mine, n, stop_at, results) for mine in plan))
    await sampler
    return results, memory


def run_mode(args, mode: str, plan, seconds: float) -> dict:
    max_batch = args.max_batch if mode == "batched" else 0
    process, port = start_server(args, max_batch)
    try:
        warm = [[entry] for entry in (p[0] for p in plan)]
        asyncio.run(drive(port, warm, args.n, 2.0, process.pid))  # warm-up: 2 s, not counted
        before = metric_buckets(get(port, "/metrics"), "vce_batch_requests")
        started = time.perf_counter()
        results, memory = asyncio.run(drive(port, plan, args.n, seconds, process.pid))
        elapsed = time.perf_counter() - started
        after = metric_buckets(get(port, "/metrics"), "vce_batch_requests")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    latency = sorted(results.pop("latency"))
    done = len(latency)
    cumulative = {le: after.get(le, 0) - before.get(le, 0) for le in sorted(after)}
    histogram, previous = {}, 0.0
    for le, count in cumulative.items():
        histogram[f"<={le:g}"] = int(count - previous)
        previous = count
    return {"mode": mode, "max_batch": max_batch, "seconds": round(elapsed, 2), "answered": done,
            "throughput_rps": round(done / elapsed, 1),
            "p50_ms": round(1000 * latency[done // 2], 2) if done else None,
            "p99_ms": round(1000 * latency[min(done - 1, int(done * 0.99))], 2) if done else None,
            **results, "batch_requests_histogram": histogram if mode == "batched" else "off",
            "rss_mb_first_last": [memory[0][1], memory[-1][1]] if memory else None,
            "rss_mb_samples": memory}


def memory_trend(samples: list) -> dict:
    """RSS at the start and end of a soak, and its slope (least squares) over each half:
    allocator warm-up shows in the first half, a leak in both."""
    def slope(part):
        t = np.array([x for x, _ in part])
        m = np.array([y for _, y in part])
        return round(float(np.polyfit(t, m, 1)[0] * 60), 3) if len(part) > 2 else None

    quarter, half = max(1, len(samples) // 4), len(samples) // 2
    return {"rss_mb_first_quarter_median": statistics.median(m for _, m in samples[:quarter]),
            "rss_mb_last_quarter_median": statistics.median(m for _, m in samples[-quarter:]),
            "rss_mb_per_min_first_half": slope(samples[:half]), "rss_mb_per_min_second_half": slope(samples[half:])}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "logical_cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=1, help="modes are interleaved, round by round")
    parser.add_argument("--n", type=int, default=1, help="variations per request")
    parser.add_argument("--modes", default="batched,unbatched")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's best)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--soak-seconds", type=float, default=0.0, help="then one batched soak this long")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 1024 or not 0 < args.seconds <= 600 or not 0 <= args.soak_seconds <= 600:
        parser.error("expected 1 <= --clients <= 1024, 0 < --seconds <= 600, 0 <= --soak-seconds <= 600")
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"batched", "unbatched"}:
        parser.error(f"--modes: expected batched and/or unbatched, got {args.modes}")
    converter = Converter.load(backend=args.backend, precision=args.precision, device=args.device, threads=args.threads)
    plan = prepare(converter, args.clients, args.n)
    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "machine_before": machine(), "runs": []}
    for round_index in range(args.rounds):
        for mode in modes:
            run = run_mode(args, mode, plan, args.seconds)
            run["round"] = round_index
            report["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "rss_mb_samples"}), flush=True)
    if args.soak_seconds:
        soak = run_mode(args, "batched", plan, args.soak_seconds)
        soak.update(memory_trend(soak["rss_mb_samples"]))
        report["soak"] = soak
        print(json.dumps({k: v for k, v in soak.items() if k != "rss_mb_samples"}), flush=True)
    report["machine_after"] = machine()
    summary = {}
    for mode in modes:
        runs = [r for r in report["runs"] if r["mode"] == mode]
        summary[mode] = {key: {"median": statistics.median(r[key] for r in runs),
                               "min": min(r[key] for r in runs), "max": max(r[key] for r in runs)}
                         for key in ("throughput_rps", "p50_ms", "p99_ms")}
        summary[mode]["errors"] = sum(sum(r["errors"].values()) for r in runs)
        summary[mode]["mixed_up"] = sum(r["mixed_up"] for r in runs)
        summary[mode]["lost"] = sum(r["lost"] for r in runs)
    if {"batched", "unbatched"} <= set(summary):
        summary["speedup"] = round(summary["batched"]["throughput_rps"]["median"]
                                   / summary["unbatched"]["throughput_rps"]["median"], 2)
    report["summary"] = summary
    print(json.dumps(summary, indent=1))
    print(json.dumps({"machine_before": report["machine_before"], "machine_after": report["machine_after"]}))
    if args.json:
        from vce_deploy.fsio import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
