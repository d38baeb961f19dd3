"""Load test of `vce serve` on loopback: N concurrent clients for T seconds, batching on and off.

    python scripts/loadtest.py --clients 64 --seconds 20 --rounds 2          # both modes, interleaved
    python scripts/loadtest.py --modes batched --max-wait-ms 0,2,5 --rounds 2  # the batcher's wait, measured
    python scripts/loadtest.py --modes batched --soak-seconds 60             # memory over a soak

Each mode starts its own `vce serve` subprocess (same bundle, backend, precision, threads; only
--max-batch differs: 0 turns batching off, so every request runs alone on the thread pool),
warms it, then runs closed-loop clients: each keeps one request in flight (a PNG glyph, n, its
own seed) and checks every answer against the same seed run alone, computed before the run in
this process. Reported per mode: throughput, p50/p99 latency, the batch-size histogram (from
the server's /metrics), errors, wrong answers (mixed up) and requests never answered (lost),
and the server's RSS sampled every half second. Bounded: loopback only, at most 1024 clients,
600 s per run. The machine is printed (CPU model, load average before and after), since the
numbers mean nothing without it (docs/serving.md, "Load test").

The client is one asyncio process on uvloop writing raw HTTP/1.1 on keep-alive connections and
asking binary answers (`Accept: application/octet-stream`, float16; `--answer json` for JSON):
its own CPU time is measured beside the server's, so a run shows whether the generator starved
the server. The bare engine's rate (batch 64, n = 1, the same backend, precision and threads, in
this process) is measured before and after the served runs, and every served rate is reported
as a share of it: the issue's target is that share (>= 75%), with p99 <= 2x the mean latency.
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

try:  # the serve extra's uvicorn[standard] brings it; without it the stock loop drives the clients
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vce_deploy import Converter  # noqa: E402

POOL = 24  # distinct (glyph, seed) requests per client, cycled
TOLERANCE = {"json": 1e-4, "float16": 1e-3, "uint8": 0.5 / 255 + 1e-6}  # answer vs the same call alone
ACCEPT = {"json": "application/json", "float16": "application/octet-stream", "uint8": "application/octet-stream"}


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


async def http_post(reader, writer, path: str, body: bytes, content_type: str, accept: str) -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive POST on an open connection: the lightest client Python has."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nAccept: {accept}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    return status, await reader.readexactly(length)


def answer_array(payload: bytes, answer: str, seed: int) -> np.ndarray | None:
    """The samples in an answer (None if the answer is not for this seed)."""
    if answer == "json":
        data = json.loads(payload)
        return np.asarray(data["images"], np.float32) if data["seed"] == seed else None
    if answer == "uint8":
        return np.frombuffer(payload, np.uint8).astype(np.float32) / 255
    return np.frombuffer(payload, "<f2").astype(np.float32)


async def client(port: int, plan, n: int, stop_at: float, results: dict, answer: str) -> None:
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
                    http_post(reader, writer, f"/v1/convert?n={n}&seed={seed}&format={answer}", body, "image/png",
                              ACCEPT[answer]), 30)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                results["lost"] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            results["latency"].append(time.perf_counter() - started)
            if status != 200:
                results["errors"][str(status)] = results["errors"].get(str(status), 0) + 1
                continue
            got = answer_array(payload, answer, seed)
            if got is None or got.size != expected.size or np.abs(got.reshape(expected.shape) - expected).max() > \
                    TOLERANCE[answer]:
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children that have exited (uvicorn's workers run as
    children of the server process: their time is read from /proc per child below)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    return cpu_seconds(pid) + sum(tree_cpu_seconds(k) for k in kids)


def own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def engine_rate(converter: Converter, seconds: float = 3.0, batch: int = 64) -> float:
    """The bare engine's images/s converting `batch` glyphs at n = 1 (one call = one engine batch)."""
    glyphs = np.stack([glyph_png(k)[1] for k in range(batch)])
    converter.convert(glyphs, 1, seed=0)  # warm
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        converter.convert(glyphs, 1, seed=calls)
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def start_server(args, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "vce_deploy", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--backend", args.backend, "--precision", args.precision, "--max-batch", str(max_batch),
               "--max-wait-ms", str(max_wait_ms), "--workers", str(args.workers)]
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


async def drive(port: int, plan, n: int, seconds: float, pid: int, answer: str) -> tuple[dict, list]:
    results = {"sent": 0, "lost": 0, "mixed_up": 0, "errors": {}, "latency": []}
    stop_at = time.monotonic() + seconds
    memory = []

    async def sample():
        while time.monotonic() < stop_at:
            memory.append((round(seconds - (stop_at - time.monotonic()), 2), rss_mb(pid)))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(client(port, mine, n, stop_at, results, answer) for mine in plan))
    await sampler
    return results, memory


def profile(path: str, pid: int, seconds: float) -> subprocess.Popen:
    """py-spy sampling the server during the measured run: a flame-graph input (raw collapsed
    stacks), from which docs/serving.md's top frames are read (scripts/loadtest.py --profile)."""
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "200", "--format", "raw", "--output", path, "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(path: str, count: int = 12) -> list[tuple[str, float]]:
    """Self time per function from py-spy's raw stacks ("a;b;c N" lines): (frame, share of samples)."""
    own: dict[str, int] = {}
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        own[leaf] = own.get(leaf, 0) + int(samples)
        total += int(samples)
    return [(frame, round(n / total, 3)) for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:count]]


def run_loop(coroutine):
    return uvloop.run(coroutine) if uvloop is not None else asyncio.run(coroutine)


def run_mode(args, mode: str, plan, seconds: float) -> dict:
    """mode: "unbatched", or "batched@W" (the batcher waiting W ms for company)."""
    max_batch = 0 if mode == "unbatched" else args.max_batch
    max_wait_ms = float(mode.split("@")[1]) if "@" in mode else 0.0
    process, port = start_server(args, max_batch, max_wait_ms)
    try:
        warm = [[entry] for entry in (p[0] for p in plan)]
        run_loop(drive(port, warm, args.n, 2.0, process.pid, args.answer))  # warm-up: 2 s, not counted
        before = metric_buckets(get(port, "/metrics"), "vce_batch_requests")
        cpu_before = (own_cpu_seconds(), tree_cpu_seconds(process.pid))
        profiler = profile(args.profile, process.pid, seconds) if args.profile else None
        started = time.perf_counter()
        results, memory = run_loop(drive(port, plan, args.n, seconds, process.pid, args.answer))
        elapsed = time.perf_counter() - started
        if profiler is not None:
            profiler.wait(60)
        client_cpu, server_cpu = own_cpu_seconds() - cpu_before[0], tree_cpu_seconds(process.pid) - cpu_before[1]
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
    return {"mode": mode, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "workers": args.workers,
            "answer": args.answer, "seconds": round(elapsed, 2), "answered": done,
            "throughput_rps": round(done / elapsed, 1), "images_per_s": round(done * args.n / elapsed, 1),
            "client_cpu_s": round(client_cpu, 2), "server_cpu_s": round(server_cpu, 2),
            "client_cpu_share": round(client_cpu / max(client_cpu + server_cpu, 1e-9), 3),
            "mean_ms": round(1000 * statistics.fmean(latency), 2) if done else None,
            "p50_ms": round(1000 * latency[done // 2], 2) if done else None,
            "p99_ms": round(1000 * latency[min(done - 1, int(done * 0.99))], 2) if done else None,
            **results, "batch_requests_histogram": histogram if max_batch else "off",
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
    parser.add_argument("--max-wait-ms", default="5", help="the batcher's wait; a comma list runs one batched mode each")
    parser.add_argument("--workers", type=int, default=1, help="vce serve --workers")
    parser.add_argument("--answer", default="float16", choices=sorted(TOLERANCE), help="the answer format asked for")
    parser.add_argument("--profile", default=None, help="py-spy's raw stacks of the server's measured runs, here")
    parser.add_argument("--engine-seconds", type=float, default=3.0, help="bare engine timing, before and after")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's best)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--soak-seconds", type=float, default=0.0, help="then one batched soak this long")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 1024 or not 0 < args.seconds <= 600 or not 0 <= args.soak_seconds <= 600:
        parser.error("expected 1 <= --clients <= 1024, 0 < --seconds <= 600, 0 <= --soak-seconds <= 600")
    chosen = [m for m in args.modes.split(",") if m]
    if not set(chosen) <= {"batched", "unbatched"}:
        parser.error(f"--modes: expected batched and/or unbatched, got {args.modes}")
    waits = [float(w) for w in args.max_wait_ms.split(",")]
    modes = [f"batched@{w:g}" for w in waits if "batched" in chosen] + (["unbatched"] if "unbatched" in chosen else [])
    converter = Converter.load(backend=args.backend, precision=args.precision, device=args.device, threads=args.threads)
    plan = prepare(converter, args.clients, args.n)
    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "machine_before": machine(), "runs": []}
    engine = [round(engine_rate(converter, args.engine_seconds), 1)]
    for round_index in range(args.rounds):
        for mode in modes:
            run = run_mode(args, mode, plan, args.seconds)
            run["round"] = round_index
            report["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "rss_mb_samples"}), flush=True)
    if args.soak_seconds:
        soak = run_mode(args, modes[0], plan, args.soak_seconds)
        soak.update(memory_trend(soak["rss_mb_samples"]))
        report["soak"] = soak
        print(json.dumps({k: v for k, v in soak.items() if k != "rss_mb_samples"}), flush=True)
    engine.append(round(engine_rate(converter, args.engine_seconds), 1))
    report["engine_batch64_images_per_s_before_after"] = engine
    report["machine_after"] = machine()
    summary = {"engine_batch64_images_per_s": statistics.fmean(engine)}
    for mode in modes:
        runs = [r for r in report["runs"] if r["mode"] == mode]
        summary[mode] = {key: {"median": statistics.median(r[key] for r in runs),
                               "min": min(r[key] for r in runs), "max": max(r[key] for r in runs)}
                         for key in ("images_per_s", "mean_ms", "p50_ms", "p99_ms", "client_cpu_share")}
        summary[mode]["share_of_engine"] = round(summary[mode]["images_per_s"]["median"]
                                                 / summary["engine_batch64_images_per_s"], 3)
        summary[mode]["p99_over_mean"] = round(summary[mode]["p99_ms"]["median"] / summary[mode]["mean_ms"]["median"], 2)
        summary[mode]["errors"] = sum(sum(r["errors"].values()) for r in runs)
        summary[mode]["mixed_up"] = sum(r["mixed_up"] for r in runs)
        summary[mode]["lost"] = sum(r["lost"] for r in runs)
    if "unbatched" in summary and len(modes) > 1:
        summary["speedup"] = round(summary[modes[0]]["images_per_s"]["median"]
                                   / summary["unbatched"]["images_per_s"]["median"], 2)
    if args.profile:
        summary["server_top_frames_self"] = top_frames(args.profile)
    report["summary"] = summary
    print(json.dumps(summary, indent=1))
    print(json.dumps({"machine_before": report["machine_before"], "machine_after": report["machine_after"]}))
    if args.json:
        from vce_deploy.fsio import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
