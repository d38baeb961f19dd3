"""Latency and throughput of every backend on the same inputs, in one run (issue 6).

    python bench/latency.py [--bundle B | --untrained DIR] [--batch-sizes 1 8 64 256]
                            [--backends ID ...] [--seconds S] [--rounds R] [--threads N]
                            [--json FILE] [--plot FILE.png] [--profile]

What is timed. A *conversion* (an "image" in images/s) is one output glyph: one (z, q) pair
through the convertor. At batch size b:
- engine:  the backend's bare `run("convertor", {"z": (b, 56), "q": (b, 1, 28, 28)})` on a
           ready batch, host arrays in and out (for a GPU: copies in, run, copy out, which
           synchronises). For the PyTorch peers: `convertor(torch.from_numpy(z), ...)` -> numpy.
- convert: `Converter.convert(image, n=b, seed=0)`: one raw 105x105 Omniglot PNG decoded and
           preprocessed, b latents drawn, the batch gathered and run, the result reshaped. The
           engine inputs above are exactly the ones this call builds, so convert - engine is
           the runtime's own overhead.
Every (backend, batch, call) cell is warmed up first (and torch.compile compiles then), then
called repeatedly for --seconds in total, split into --rounds slices that interleave the
backends, so a change of machine load hits every backend alike. p50/p90/p99 are per call;
images/s is b * calls / time spent in calls.

Speed-ups compare engine calls at the same batch on the same kind of device: against eager
PyTorch as users run it (contiguous fp32, the baseline) and against the fastest PyTorch peer
(eager, channels_last, torch.compile). max_abs_err: |y - y_eager| on the same inputs.

Roofline: FLOPs per conversion are counted from the fp32 convertor ONNX graph (see
`count_flops`), the machine's fp32 peak is a large matrix product measured in the same run,
and share_of_peak = images/s * FLOPs per conversion / peak.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/latency.py` from anywhere: vce_deploy, export, train
    sys.path.insert(0, str(ROOT))

from vce_deploy import Converter, VCEError, preprocess_batch  # noqa: E402
from vce_deploy.backends import HostLatentSampler  # noqa: E402
from vce_deploy.backends.base import physical_cores  # noqa: E402
from vce_deploy.bundle import DEFAULT_BUNDLE, MANIFEST, Bundle  # noqa: E402

SEED = 0
DEFAULT_BATCHES = (1, 8, 64, 256)
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"  # DESIGN.md "Data": the test alphabets' zips


# -- the machine ----------------------------------------------------------------------------

def machine_info(threads: int) -> dict[str, Any]:
    """CPU, cores, memory, library versions and load: printed at the head of every run."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
           if f in flags]
    info: dict[str, Any] = {
        "cpu": cpu, "isa": isa, "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
        "threads": threads, "python": platform.python_version(), "os": platform.platform(),
        "numpy": np.__version__, "load_avg_start": list(os.getloadavg()),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for name in ("torch", "onnxruntime", "onnx"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    blas = [k for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ]
    info["env"] = {k: os.environ[k] for k in blas}
    return info


def measure_peak(threads: int, size: int = 2048, reps: int = 10) -> dict[str, float]:
    """fp32 GFLOP/s of a size^3 matrix product, best of `reps`, on `threads` threads: the
    machine's practical peak (MKL sgemm through torch; numpy's BLAS beside it for reference)."""
    result: dict[str, float] = {"matmul_size": size}
    flops = 2.0 * size ** 3
    try:
        import torch

        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(2):
            a @ b
        best = min(_wall(lambda: a @ b) for _ in range(reps))
        result["torch_gflops"] = flops / best / 1e9
    except ImportError:
        pass
    a, b = (np.random.default_rng(0).standard_normal((size, size), dtype=np.float32) for _ in range(2))
    a @ b
    best = min(_wall(lambda: a @ b) for _ in range(max(3, reps // 2)))
    result["numpy_gflops"] = flops / best / 1e9
    # the higher of the two is the peak: a share of it never flatters a backend
    result["peak_gflops"] = max(result.get("torch_gflops", 0.0), result["numpy_gflops"])
    return result


def _wall(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- FLOPs from the graph -------------------------------------------------------------------

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Exp"}


def count_flops(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """FLOPs of one conversion (batch 1) in an fp32 ONNX graph, after shape inference.

    Conv: 2 * Cout * Cin/group * kH * kW * Hout * Wout (a multiply and an add per weight tap)
    plus Cout * Hout * Wout for the bias; elementwise ops (Add, Relu, Sigmoid, ...): one per
    output element. Layout ops (Concat, Expand, Reshape, Transpose) count zero.
    """
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    shapes: dict[str, list] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    weights = {init.name: numpy_helper.to_array(init).shape for init in graph.initializer}
    conv, elementwise, convs = 0, 0, []
    for node in graph.node:
        out = shapes.get(node.output[0])
        if out is None or any(d is None for d in out[1:]):
            raise ValueError(f"{onnx_path}: no static shape for {node.op_type} output {node.output[0]!r}")
        per_image = math.prod(out[1:])  # elements of one image's output
        if node.op_type == "Conv":
            w = weights.get(node.input[1])
            if w is None:
                raise ValueError(f"{onnx_path}: Conv {node.name!r} weight {node.input[1]!r} is not an initializer")
            cout, cin_per_group, kh, kw = w
            flops = 2 * cout * cin_per_group * kh * kw * out[2] * out[3]
            if len(node.input) > 2:
                flops += per_image  # bias
            conv += flops
            convs.append({"name": node.name, "weight": list(w), "out": out[1:], "flops": flops})
        elif node.op_type in ELEMENTWISE:
            elementwise += per_image
    return {"flops": conv + elementwise, "conv_flops": conv, "elementwise_flops": elementwise, "convs": convs}


# -- the peers ------------------------------------------------------------------------------

@dataclass
class Peer:
    """One backend at one precision, ready to call, or the reason it cannot run here."""

    id: str
    backend: str  # torch-eager, torch-channels-last, torch-compile, onnxruntime, tensorrt
    precision: str
    device: str
    family: str  # "torch" (a PyTorch peer) or "runtime" (a vce_deploy backend)
    engine: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None  # (z, q) -> y, bare
    convert: Callable[[Any, int], np.ndarray] | None = None  # (image, n) -> (1, n, 28, 28)
    detail: str = ""
    reason: str | None = None  # set when it cannot run here
    close: Callable[[], None] = lambda: None


@dataclass
class Context:
    bundle: Path
    threads: int
    max_batch: int


def _runtime_peer(peer_id: str, backend: str, precision: str, device: str | None, label: str) -> Callable:
    """A vce_deploy backend through Converter.load, exactly as an application loads it."""

    def build(ctx: Context) -> Peer:
        conv = Converter.load(ctx.bundle, backend=backend, precision=precision, device=device,
                              max_batch=ctx.max_batch, threads=ctx.threads)
        engine = conv.backend  # its run() is the bare engine call

        def bare(z: np.ndarray, q: np.ndarray) -> np.ndarray:
            return engine.run("convertor", {"z": z, "q": q})["y"]

        def end_to_end(image: Any, n: int) -> np.ndarray:
            return conv.convert(image, n=n, seed=SEED)

        return Peer(peer_id, label, precision, conv.backend_info.device, "torch" if backend == "torch" else "runtime",
                    bare, end_to_end, conv.backend_info.detail, close=conv.close)

    return build


def _torch_model(ctx: Context, channels_last: bool):
    import torch

    from vce_deploy.checkpoint import load_model

    checkpoint = Bundle.load(ctx.bundle).checkpoint
    if checkpoint is None:
        raise VCEError(f"{ctx.bundle} has no checkpoint.safetensors: the PyTorch peers run the bundle's checkpoint")
    model, _ = load_model(checkpoint)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.convertor.to(memory_format=fmt), fmt


def _torch_engine(module, fmt) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    import torch

    def bare(z: np.ndarray, q: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            y = module(torch.from_numpy(z), torch.from_numpy(q).contiguous(memory_format=fmt))
        return y.contiguous().numpy()

    return bare


def _channels_last_peer(ctx: Context) -> Peer:
    import torch

    module, fmt = _torch_model(ctx, channels_last=True)
    return Peer("torch-channels-last", "torch-channels-last", "fp32", "cpu", "torch", _torch_engine(module, fmt),
                detail=f"eager torch {torch.__version__}, channels_last weights and activations, "
                       f"{torch.get_num_threads()} threads")


def _compile_peer(ctx: Context) -> Peer:
    import torch

    module, fmt = _torch_model(ctx, channels_last=True)
    # channels_last + inductor: the strongest PyTorch form we know; dynamic=False gives each
    # batch size its own specialised graph (compiled during that cell's warm-up)
    compiled = torch.compile(module, dynamic=False)
    return Peer("torch-compile", "torch-compile", "fp32", "cpu", "torch", _torch_engine(compiled, fmt),
                detail=f"torch.compile (inductor, dynamic=False) of the channels_last convertor, torch "
                       f"{torch.__version__}, {torch.get_num_threads()} threads")


# id -> builder; the order is the table's order
PEERS: dict[str, Callable[[Context], Peer]] = {
    "torch-eager": _runtime_peer("torch-eager", "torch", "fp32", "cpu", "torch-eager"),
    "torch-channels-last": _channels_last_peer,
    "torch-compile": _compile_peer,
    "ort-cpu-fp32": _runtime_peer("ort-cpu-fp32", "onnxruntime", "fp32", "cpu", "onnxruntime"),
    "ort-cpu-fp16": _runtime_peer("ort-cpu-fp16", "onnxruntime", "fp16", "cpu", "onnxruntime"),
    "ort-cpu-int8": _runtime_peer("ort-cpu-int8", "onnxruntime", "int8", "cpu", "onnxruntime"),
    "torch-eager-cuda": _runtime_peer("torch-eager-cuda", "torch", "fp32", "cuda", "torch-eager"),
    "ort-cuda-fp32": _runtime_peer("ort-cuda-fp32", "onnxruntime", "fp32", "cuda", "onnxruntime"),
    "ort-cuda-fp16": _runtime_peer("ort-cuda-fp16", "onnxruntime", "fp16", "cuda", "onnxruntime"),
    "ort-cuda-int8": _runtime_peer("ort-cuda-int8", "onnxruntime", "int8", "cuda", "onnxruntime"),
    "tensorrt-fp32": _runtime_peer("tensorrt-fp32", "tensorrt", "fp32", "cuda", "tensorrt"),
    "tensorrt-fp16": _runtime_peer("tensorrt-fp16", "tensorrt", "fp16", "cuda", "tensorrt"),
    "tensorrt-int8": _runtime_peer("tensorrt-int8", "tensorrt", "int8", "cuda", "tensorrt"),
}
BASELINE = "torch-eager"


def _skipped(peer_id: str, reason: str) -> Peer:
    precision = next((p for p in ("fp32", "fp16", "int8") if peer_id.endswith(p)), "fp32")
    device = "cuda" if ("cuda" in peer_id or peer_id.startswith("tensorrt")) else "cpu"
    return Peer(peer_id, peer_id.rsplit("-", 1)[0] if peer_id[-4:] in ("fp32", "fp16", "int8") else peer_id,
                precision, device, "torch" if peer_id.startswith("torch") else "runtime", reason=reason)


def build_peers(ids: Sequence[str], ctx: Context) -> list[Peer]:
    peers = []
    for peer_id in ids:
        try:
            peers.append(PEERS[peer_id](ctx))
        except (VCEError, ImportError, RuntimeError, OSError) as err:
            peers.append(_skipped(peer_id, _one_line(err)))
    return peers


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


# -- inputs ---------------------------------------------------------------------------------

def condition_image() -> tuple[Any, str]:
    """The glyph every backend converts: a raw Omniglot test-alphabet PNG (105x105) when the
    data is there, else a drawn stand-in of the same size."""
    for path in sorted(OMNIGLOT.glob("images_background_small*.zip")):
        try:
            with zipfile.ZipFile(path) as archive:
                names = sorted(n for n in archive.namelist() if "/Tagalog/" in n and n.endswith(".png"))
                if names:
                    return archive.read(names[0]), f"Omniglot {names[0]}, {path.name} (PNG bytes, 105x105)"
        except (OSError, zipfile.BadZipFile):
            continue
    image = np.full((105, 105), 255, np.uint8)  # dark strokes on white, like Omniglot
    image[20:85, 48:56] = 0
    image[48:56, 20:85] = 0
    return image, "a drawn 105x105 cross (Omniglot zip not found)"


def engine_inputs(image: Any, batch: int, latent_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly what `Converter.convert(image, n=batch, seed=SEED)` hands the engine."""
    q = np.repeat(preprocess_batch(image), batch, axis=0)  # (b, 1, 28, 28)
    z = HostLatentSampler(SEED).draw(batch, latent_dim, 1.0)  # (b, 56)
    return z, q


# -- timing ---------------------------------------------------------------------------------

@dataclass
class Cell:
    """The calls of one (peer, batch, call kind)."""

    times_ns: list[int] = field(default_factory=list)
    first_call_s: float | None = None
    error: str | None = None


def warm_up(fn: Callable[[], Any], seconds: float, calls: int = 3) -> float:
    """At least `calls` calls and `seconds`; returns the first call's time (compile, caches)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    done = 1
    while done < calls or time.perf_counter() - start < seconds:
        fn()
        done += 1
    return first


def time_slice(fn: Callable[[], Any], seconds: float, min_calls: int, out: list[int]) -> None:
    gc.collect()
    gc.disable()  # no collector pause inside a timed call
    try:
        end = time.perf_counter() + seconds
        done = 0
        while done < min_calls or time.perf_counter() < end:
            start = time.perf_counter_ns()
            fn()
            out.append(time.perf_counter_ns() - start)
            done += 1
    finally:
        gc.enable()


def run_benchmark(peers: list[Peer], batch_sizes: Sequence[int], seconds: float, rounds: int, warmup_s: float,
                  image: Any, latent_dim: int, min_calls: int = 5, log=print) -> dict:
    """Time every runnable peer at every batch size; returns cells and outputs."""
    cells: dict[tuple[str, int, str], Cell] = {}
    outputs: dict[tuple[str, int], np.ndarray] = {}
    convert_diff: dict[tuple[str, int], float] = {}
    live = [p for p in peers if p.reason is None]
    per_slice_calls = max(1, math.ceil(min_calls / rounds))
    for batch in batch_sizes:
        z, q = engine_inputs(image, batch, latent_dim)
        kinds = {}
        for peer in live:
            if peer.reason is not None:  # failed at an earlier batch (e.g. torch.compile)
                continue
            kinds[peer.id] = [("engine", lambda p=peer: p.engine(z, q))]
            if peer.convert is not None:
                kinds[peer.id].append(("convert", lambda p=peer: p.convert(image, batch)))
            try:  # outputs for the error columns (the first call: compile, allocations), then warm-up
                start = time.perf_counter()
                outputs[(peer.id, batch)] = np.array(peer.engine(z, q), copy=True)
                first = time.perf_counter() - start
                for kind, fn in kinds[peer.id]:
                    cell = cells.setdefault((peer.id, batch, kind), Cell())
                    cell.first_call_s = first if kind == "engine" else warm_up(fn, warmup_s)
                    if kind == "engine":
                        warm_up(fn, warmup_s)
                if peer.convert is not None:
                    y = peer.convert(image, batch).reshape(outputs[(peer.id, batch)].shape)
                    convert_diff[(peer.id, batch)] = float(np.abs(y - outputs[(peer.id, batch)]).max())
            except Exception as err:  # noqa: BLE001 - a peer that fails here is reported, not fatal
                peer.reason = f"failed at batch {batch}: {_one_line(err)}"
                kinds.pop(peer.id, None)
                log(f"  {peer.id}: {peer.reason}")
        for _ in range(rounds):  # interleave: every peer gets a slice of each round
            for peer in live:
                for kind, fn in kinds.get(peer.id, []):
                    time_slice(fn, seconds / rounds, per_slice_calls, cells[(peer.id, batch, kind)].times_ns)
        log(f"  batch {batch}: done ({', '.join(kinds)})")
    return {"cells": cells, "outputs": outputs, "convert_diff": convert_diff}


# -- records --------------------------------------------------------------------------------

def _stats(times_ns: list[int], batch: int) -> dict[str, float]:
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "calls": len(ms),
            "images_per_s": float(batch * len(ms) / (ms.sum() / 1e3))}


def make_records(peers: list[Peer], batch_sizes: Sequence[int], result: dict, flops: dict, peak: dict,
                 machine: dict) -> list[dict]:
    cells, outputs = result["cells"], result["outputs"]
    records = []
    for peer in peers:
        base = {"id": peer.id, "backend": peer.backend, "precision": peer.precision, "device": peer.device,
                "family": peer.family, "detail": peer.detail, "skipped": peer.reason}
        measured = [b for b in batch_sizes if (peer.id, b, "engine") in cells and cells[(peer.id, b, "engine")].times_ns]
        if not measured:
            records.append({**base, "batch_size": None, **{k: None for k in _NUMERIC}})
            continue
        for batch in measured:
            engine = _stats(cells[(peer.id, batch, "engine")].times_ns, batch)
            record = {**base, "skipped": None, "batch_size": batch, **engine}
            record["first_call_s"] = cells[(peer.id, batch, "engine")].first_call_s
            convert = cells.get((peer.id, batch, "convert"))
            if convert is not None and convert.times_ns:
                c = _stats(convert.times_ns, batch)
                record.update({f"convert_{k}": v for k, v in c.items()})
                record["convert_overhead"] = c["p50_ms"] / engine["p50_ms"] - 1.0
                record["convert_vs_engine_max_abs"] = result["convert_diff"].get((peer.id, batch))
            else:
                record.update({f"convert_{k}": None for k in ("p50_ms", "p90_ms", "p99_ms", "calls", "images_per_s")})
                record["convert_overhead"] = None
            reference = outputs.get((BASELINE if not peer.device.startswith("cuda") else "torch-eager-cuda", batch))
            if reference is None:
                reference = outputs.get((BASELINE, batch))
            mine = outputs.get((peer.id, batch))
            record["max_abs_err"] = None if reference is None or mine is None else float(np.abs(mine - reference).max())
            record["gflops"] = record["images_per_s"] * flops["flops"] / 1e9
            record["share_of_peak"] = record["gflops"] / peak["peak_gflops"]
            record["flops_per_image"] = flops["flops"]
            record["peak_gflops"] = peak["peak_gflops"]
            record["threads"] = machine["threads"]
            records.append(record)
    # speed-ups: engine calls at the same batch, on the same kind of device
    for record in records:
        if record["batch_size"] is None:
            record["speedup_vs_eager"] = record["speedup_vs_best_torch"] = None
            continue
        gpu = record["device"].startswith("cuda")
        same = [r for r in records if r["batch_size"] == record["batch_size"] and r["device"].startswith("cuda") == gpu]
        eager = next((r for r in same if r["backend"] == "torch-eager"), None)
        torch_rates = [r["images_per_s"] for r in same if r["family"] == "torch"]
        record["speedup_vs_eager"] = record["images_per_s"] / eager["images_per_s"] if eager else None
        record["speedup_vs_best_torch"] = record["images_per_s"] / max(torch_rates) if torch_rates else None
    return records


_NUMERIC = ("p50_ms", "p90_ms", "p99_ms", "calls", "images_per_s", "speedup_vs_eager", "speedup_vs_best_torch",
            "max_abs_err", "gflops", "share_of_peak", "convert_p50_ms", "convert_images_per_s", "convert_overhead")


# -- output ---------------------------------------------------------------------------------

def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown(records: list[dict], machine: dict, peak: dict, flops: dict, bundle_note: str, image_note: str,
             seconds: float, rounds: int) -> str:
    lines = [
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['physical_cores']} physical cores / {machine['logical_cpus']} logical"
        f" ({', '.join(machine['isa']) or 'no AVX2'}); {machine.get('memory_gib', '?')} GiB",
        f"- threads per backend: {machine['threads']}; load average (1, 5, 15 min) at start "
        f"{_loads(machine['load_avg_start'])}, at end {_loads(machine.get('load_avg_end'))}",
        f"- python {machine['python']}, numpy {machine['numpy']}, torch {machine['torch']}, "
        f"onnxruntime {machine['onnxruntime']}, onnx {machine['onnx']}; {machine['os']}"
        + (f"; env {machine['env']}" if machine["env"] else ""),
        f"- fp32 peak (best of 10 {peak['matmul_size']}^3 matmuls, same run): torch "
        f"{_fmt(peak.get('torch_gflops'), '.1f')} GFLOP/s, numpy {peak['numpy_gflops']:.1f} GFLOP/s; "
        f"peak used = {peak['peak_gflops']:.1f} GFLOP/s",
        f"- work: {flops['flops'] / 1e6:.1f} MFLOP per conversion from the fp32 convertor graph "
        f"({flops['conv_flops'] / 1e6:.1f} M in {len(flops['convs'])} Convs, "
        f"{flops['elementwise_flops'] / 1e6:.2f} M elementwise)",
        f"- bundle: {bundle_note}; input: {image_note}",
        f"- timing: per cell a warm-up, then {seconds:g} s of calls in {rounds} interleaved rounds; "
        "engine = bare backend call on a ready batch (host arrays in and out), convert = "
        "Converter.convert(image, n=batch) end to end",
        "",
        "## Results",
        "",
        "| backend | precision | batch | engine p50 ms | p90 ms | p99 ms | calls | images/s | x eager | x best torch "
        "| convert p50 ms | convert images/s | convert overhead % | max abs err | GFLOP/s | % of peak |",
        "|" + "---|" * 16,
    ]
    for r in records:
        if r["batch_size"] is None:
            continue
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['batch_size']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} "
            f"| {r['p99_ms']:.3f} | {r['calls']} | {r['images_per_s']:.0f} | {_fmt(r['speedup_vs_eager'], '.2f')} "
            f"| {_fmt(r['speedup_vs_best_torch'], '.2f')} | {_fmt(r['convert_p50_ms'], '.3f')} "
            f"| {_fmt(r['convert_images_per_s'], '.0f')} | {_fmt(_pct(r['convert_overhead']), '+.1f')} "
            f"| {_fmt(r['max_abs_err'], '.1e')} | {r['gflops']:.1f} | {100 * r['share_of_peak']:.1f} |"
        )
    skipped = [r for r in records if r["batch_size"] is None]
    if skipped:
        lines += ["", "## Not run here", "", "| backend | precision | device | reason |", "|---|---|---|---|"]
        lines += [f"| {r['id']} | {r['precision']} | {r['device']} | {r['skipped']} |" for r in skipped]
    details = {r["id"]: r["detail"] for r in records if r["batch_size"] is not None}
    if details:
        lines += ["", "Backends: " + "; ".join(f"**{k}**: {v}" for k, v in details.items())]
    return "\n".join(lines) + "\n"


def _pct(value):
    return None if value is None else 100 * value


def _loads(loads) -> str:
    return "-" if loads is None else ", ".join(f"{x:.2f}" for x in loads)


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for peer_id in dict.fromkeys(r["id"] for r in records if r["batch_size"] is not None):
        rows = [r for r in records if r["id"] == peer_id and r["batch_size"] is not None]
        ax.plot([r["batch_size"] for r in rows], [r["images_per_s"] for r in rows], marker="o",
                label=f"{rows[0]['backend']} {rows[0]['precision']} ({rows[0]['device']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (conversions per call)")
    ax.set_ylabel("images/s (bare engine call)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- where the time goes (--profile) --------------------------------------------------------

def profile_onnxruntime(bundle: Bundle, precision: str, batch: int, threads: int, z: np.ndarray, q: np.ndarray,
                        runs: int = 20, warmup: int = 3) -> dict:
    """ONNX Runtime's own profiler on the convertor, set up as the runtime sets up its session:
    per-op-type kernel time per run, warm-up runs left out."""
    import onnxruntime as ort

    entry = bundle.model_entry("convertor", precision, "onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(bundle.file(entry.path)), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, {"z": z, "q": q})
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[warmup:]
    start = model_runs[0]["ts"]
    per_op: dict[str, float] = {}
    nodes: dict[str, set] = {}  # op type -> node names of the optimised graph that ran
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= start:
            op = event.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + event["dur"]
            nodes.setdefault(op, set()).add(event["name"])
    count = len(model_runs)
    return {"precision": precision, "batch": batch, "runs": count,
            "run_ms": float(np.median([e["dur"] for e in model_runs])) / 1e3,
            "per_op_ms": {op: us / count / 1e3 for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])},
            "nodes": {op: len(names) for op, names in nodes.items()}}


def conv_microbench(batch: int, threads: int, peak_gflops: float, seconds: float = 1.0) -> list[dict]:
    """One trunk conv (32 -> 32, 3x3, SAME, 28x28) and the GEMM an im2col conv of that shape
    becomes ((b*784, 288) x (288, 32)): how much of the peak this layer shape allows."""
    import torch
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 28, 28), dtype=np.float32)
    w = rng.standard_normal((32, 32, 3, 3), dtype=np.float32) * 0.05
    flops = 2 * 32 * 32 * 9 * 28 * 28 * batch
    rows = []

    def rate(name: str, fn: Callable[[], Any], work: float) -> None:
        warm_up(fn, 0.2)
        times: list[int] = []
        time_slice(fn, seconds, 5, times)
        best = np.median(times) / 1e9
        gflops = work / best / 1e9
        rows.append({"kernel": name, "batch": batch, "ms": best * 1e3, "gflops": gflops, "share_of_peak": gflops / peak_gflops})

    conv = torch.nn.Conv2d(32, 32, 3, padding=1).eval()
    conv.weight.data = torch.from_numpy(w)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        rate("torch conv, contiguous", lambda: conv(xt), flops)
        conv_cl = conv.to(memory_format=torch.channels_last)
        xcl = xt.contiguous(memory_format=torch.channels_last)
        rate("torch conv, channels_last", lambda: conv_cl(xcl), flops)
        a = torch.randn(batch * 784, 288)
        b = torch.randn(288, 32)
        rate("torch matmul (b*784, 288) x (288, 32)", lambda: a @ b, 2.0 * batch * 784 * 288 * 32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32, 28, 28])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(32, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rate("onnxruntime Conv", lambda: session.run(None, {"x": x}), flops)
    return rows


def overhead_breakdown(bundle_path: Path, threads: int, image: Any, batch: int = 1, seconds: float = 1.0) -> list[dict]:
    """What Converter.convert does besides the engine call, each step timed alone (median of
    repeated calls), on ONNX Runtime fp32 at `batch`."""
    converter = Converter.load(bundle_path, backend="onnxruntime", precision="fp32", device="cpu", threads=threads,
                               max_batch=max(batch, 1))
    engine = converter.backend
    latent = converter.latent_dim
    conditions = preprocess_batch(image)
    z, q = engine_inputs(image, batch, latent)
    steps = {
        "Converter.convert(image, n) end to end": lambda: converter.convert(image, n=batch, seed=SEED),
        "Converter.convert(preprocessed 28x28 array, n)": lambda: converter.convert(conditions[0, 0], n=batch, seed=SEED),
        "engine run (bare)": lambda: engine.run("convertor", {"z": z, "q": q}),
        "preprocess_batch(image), then the bare engine run": lambda: (
            preprocess_batch(image), engine.run("convertor", {"z": z, "q": q})),
        "preprocess_batch(image): decode, grayscale, resize, binarize": lambda: preprocess_batch(image),
        "noise: HostLatentSampler(seed).draw(n, 56)": lambda: HostLatentSampler(SEED).draw(batch, latent, 1.0),
        "gather conditions[rows] and index arithmetic": lambda: conditions[np.arange(batch) // batch],
    }
    rows = []
    for attempt in range(2):  # the first pass settles the session and caches; the second is reported
        rows = []
        for name, fn in steps.items():
            warm_up(fn, 0.1)
            times: list[int] = []
            time_slice(fn, seconds / 2, 20, times)
            rows.append({"step": name, "ms": float(np.median(times)) / 1e6})
    converter.close()
    return rows


def profile_report(bundle: Bundle, batch: int, threads: int, peak: dict, flops: dict, image: Any) -> str:
    """--profile: ONNX Runtime per op at `batch`, one conv alone, and convert's overhead at batch 1."""
    z, q = engine_inputs(image, batch, bundle.manifest.latent_dim)
    lines = ["", f"## Where the time goes (batch {batch}, {threads} threads)", ""]
    for precision in ("fp32", "int8"):
        if not bundle.entries("convertor", "onnx", precision):
            continue
        try:
            prof = profile_onnxruntime(bundle, precision, batch, threads, z, q)
        except (VCEError, KeyError) as err:
            lines.append(f"- onnxruntime {precision}: not profiled ({_one_line(err)})")
            continue
        conv_ms = sum(ms for op, ms in prof["per_op_ms"].items() if "Conv" in op)
        lines.append(f"ONNX Runtime profiler, convertor {precision}: {prof['run_ms']:.2f} ms per run; conv ops "
                     f"{conv_ms:.2f} ms = {flops['conv_flops'] * batch / conv_ms / 1e6:.1f} GFLOP/s "
                     f"({100 * flops['conv_flops'] * batch / conv_ms / 1e6 / peak['peak_gflops']:.0f}% of peak)")
        lines += ["", "| op (optimised graph) | nodes | ms per run | share |", "|---|---|---|---|"]
        total = sum(prof["per_op_ms"].values())
        lines += [f"| {op} | {prof['nodes'][op]} | {ms:.3f} | {100 * ms / total:.1f}% |"
                  for op, ms in prof["per_op_ms"].items()]
        lines.append("")
    try:
        micro = conv_microbench(batch, threads, peak["peak_gflops"])
    except ImportError as err:
        lines.append(f"single-conv microbenchmark not run: {_one_line(err)}")
    else:
        lines += ["One trunk conv (32 -> 32, 3x3, 28x28) and its im2col GEMM, alone:", "",
                  "| kernel | ms | GFLOP/s | share of peak |", "|---|---|---|---|"]
        lines += [f"| {m['kernel']} | {m['ms']:.3f} | {m['gflops']:.1f} | {100 * m['share_of_peak']:.0f}% |" for m in micro]
    overhead = overhead_breakdown(bundle.path, threads, image)
    lines += ["", "Converter.convert at batch 1 on ONNX Runtime fp32, step by step (median ms per call):", "",
              "| step | ms |", "|---|---|"]
    lines += [f"| {o['step']} | {o['ms']:.3f} |" for o in overhead]
    return "\n".join(lines) + "\n"


# -- a bundle to time when none ships yet ---------------------------------------------------

def make_untrained_bundle(out: Path, log=print) -> Path:
    """The default architecture with untrained (seeded) weights, exported with fp32, fp16 and
    int8 graphs: the same shapes and FLOPs as the shipped model. Made once, reused after."""
    if (out / MANIFEST).is_file():
        return out
    import torch

    from export import export_bundle
    from train.config import TrainConfig
    from vce_deploy.checkpoint import save_checkpoint
    from vce_deploy.model import VCE, ModelConfig

    torch.manual_seed(SEED)
    model = VCE(ModelConfig())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        checkpoint = Path(tmp) / "untrained.safetensors"
        save_checkpoint(checkpoint, {f"model.{k}": v for k, v in model.state_dict().items()},
                        {"model_config": ModelConfig().to_dict(), "train_config": TrainConfig().to_dict(),
                         "step": 0, "seed": SEED})
        export_bundle(checkpoint, out, precisions=("fp32", "fp16", "int8"), measure_nll=False, log=lambda *_: None)
    log(f"made an untrained default-architecture bundle at {out}")
    return out


# -- main -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/latency.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--bundle", default=None, help="bundle directory (default: the shipped default bundle)")
    where.add_argument("--untrained", metavar="DIR", default=None,
                       help="time an untrained default-architecture bundle, made in DIR if it is not there")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    parser.add_argument("--backends", nargs="+", default=list(PEERS), choices=list(PEERS), metavar="ID",
                        help=f"which peers (default all): {', '.join(PEERS)}")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per backend, batch and call (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds those seconds are split into (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per cell, at least 3 calls (default 0.5)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every backend (default: physical cores)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the records as a JSON list")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="throughput against batch size, log axes")
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the fp32 peak (default 2048)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile ONNX Runtime per op and time a single conv (at --profile-batch)")
    parser.add_argument("--profile-batch", type=int, default=64)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    if (any(b < 1 for b in args.batch_sizes) or args.seconds <= 0 or args.rounds < 1 or args.warmup < 0
            or args.peak_size < 16 or (args.threads is not None and args.threads < 1)):
        print("bench: error: expected batch sizes >= 1, --seconds > 0, --rounds >= 1, --warmup >= 0, "
              "--peak-size >= 16, --threads >= 1", file=sys.stderr)
        return 2
    try:
        if args.untrained:
            bundle_path = make_untrained_bundle(Path(args.untrained))
            bundle_note = f"{bundle_path} (untrained default architecture: timing is weight-independent)"
        elif args.bundle:
            bundle_path = Path(args.bundle)
            bundle_note = str(bundle_path)
        elif (DEFAULT_BUNDLE / MANIFEST).is_file():
            bundle_path, bundle_note = DEFAULT_BUNDLE, f"{DEFAULT_BUNDLE} (the shipped default bundle)"
        else:
            print(f"bench: error: no default bundle at {DEFAULT_BUNDLE}. Pass --bundle DIR (make one with "
                  "`python -m export CHECKPOINT --out DIR`), or --untrained DIR to time an untrained bundle "
                  "of the default architecture", file=sys.stderr)
            return 1
        bundle = Bundle.load(bundle_path)
    except VCEError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1

    threads = args.threads or physical_cores()
    try:
        import torch
    except ImportError:
        torch = None
    torch_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(threads)  # process-wide: every PyTorch peer and the peak share it
    try:
        return _run(args, bundle, bundle_path, bundle_note, threads)
    finally:
        if torch is not None:  # leave the caller's process (python -m bench, a test session) as it was
            torch.set_num_threads(torch_threads)


def _run(args: argparse.Namespace, bundle: Bundle, bundle_path: Path, bundle_note: str, threads: int) -> int:
    machine = machine_info(threads)
    peak = measure_peak(threads, size=args.peak_size)
    flops = count_flops(bundle.file(bundle.model_entry("convertor", "fp32", "onnx").path))
    image, image_note = condition_image()
    ctx = Context(bundle_path, threads, max(args.batch_sizes))
    print(f"bench: {len(args.backends)} backends x batch sizes {args.batch_sizes}, {args.seconds:g} s each; "
          f"peak {peak['peak_gflops']:.1f} GFLOP/s, {flops['flops'] / 1e6:.1f} MFLOP per conversion", file=sys.stderr)
    peers = build_peers(args.backends, ctx)
    try:
        result = run_benchmark(peers, args.batch_sizes, args.seconds, args.rounds, args.warmup, image,
                               bundle.manifest.latent_dim, log=lambda m: print(m, file=sys.stderr))
    finally:
        for peer in peers:
            peer.close()
    machine["load_avg_end"] = list(os.getloadavg())
    records = make_records(peers, args.batch_sizes, result, flops, peak, machine)
    for record in records:
        record["load_avg_start"], record["load_avg_end"] = machine["load_avg_start"], machine["load_avg_end"]
    report = markdown(records, machine, peak, flops, bundle_note, image_note, args.seconds, args.rounds)
    if args.profile:
        report += profile_report(bundle, args.profile_batch, threads, peak, flops, image)
    sys.stdout.write(report)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    if args.plot:
        plot(records, args.plot, f"VCE convertor, {machine['cpu']}, {threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
