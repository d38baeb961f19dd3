"""The GPU check: one command for a machine with an NVIDIA GPU, PyTorch and CuPy (TensorRT and
onnxruntime-gpu optional), no internet. `bash scripts/gpu_check.sh OUT_DIR` runs it.

    python -m bench.gpu_check OUT_DIR [--device cuda:0|cpu] [--quick] [--budget-s 420]

Sections, each recorded as ok / FAILED / skipped (with the reason) in OUT_DIR/gpu_check.json
and gpu_check.md:
  environment  torch, CUDA device, CuPy, TensorRT, ONNX Runtime providers, CPU
  parity       Converter(torch, device) against Converter(torch, cpu) fp32 on the bundle's
               golden inputs (real glyphs, fixed noise): max |diff| <= 1e-3
  seeds        the same seed twice gives identical output; across max_batch, the difference
  threads      16 threads share one Converter; each answer equals its call made alone
  latency      convertor batch 1..256: the Converter's engine (CUDA graphs) against eager
               CUDA PyTorch on the same device tensors, and convert() end to end; interleaved
               rounds, median and spread, throughput at batch 256
  tensorrt     `vce build` + golden check + batch-256 latency, if tensorrt is installed
  onnxruntime  the CUDA/TensorRT providers' golden check, if onnxruntime-gpu is installed

--device cpu is the dry mode: the same code on the CPU (no CUDA graphs), so the suite can
run it (tests/test_gpu_check.py). What it measured on a CPU says nothing about a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vce_deploy import Converter
from vce_deploy.bundle import DEFAULT_BUNDLE, Bundle
from vce_deploy.golden import compare, load_golden, run_golden

PARITY_TARGET = 1e-3
THREADS = 16
# how much work each section does: the full check, and --quick (the suite's dry run on a busy CPU)
FULL = {"seed_images": 8, "seed_n": 32, "rebatch": 48, "thread_images": 4, "thread_n": 16, "thread_iters": 3,
        "batches": [1, 16, 64, 256], "rounds": 7, "calls": 5}
QUICK = {"seed_images": 2, "seed_n": 8, "rebatch": 5, "thread_images": 1, "thread_n": 4, "thread_iters": 1,
         "batches": [1, 4], "rounds": 2, "calls": 1}


class Check:
    """Runs sections against a time budget and records each one's outcome."""

    def __init__(self, out: Path, budget_s: float, meta: dict):
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.report: dict[str, Any] = {**meta, "sections": {}}

    def section(self, name: str, fn: Callable[[], dict]) -> None:
        started = time.monotonic()
        if started > self.deadline:
            result = {"status": "skipped: time budget spent"}
        else:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - one broken section must not hide the others
                result = {"status": "FAILED", "error": f"{type(err).__name__}: {err}"}
        result["seconds"] = round(time.monotonic() - started, 2)
        self.report["sections"][name] = result
        print(f"[gpu_check] {name}: {result['status']} ({result['seconds']} s)", flush=True)
        self.write()  # after every section: a killed run still leaves what it measured

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.report))


def _sync(torch, device: str) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def environment(device: str) -> dict:
    import platform

    import torch

    info: dict[str, Any] = {"status": "ok", "python": platform.python_version(), "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available(), "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    for name in ("cupy", "tensorrt", "onnxruntime"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    if info["onnxruntime"] != "not installed":
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    from vce_deploy.cpu import this_cpu

    info["cpu"] = this_cpu().describe()  # model and the flags that decide reduced-precision speed
    return info


def parity(device: str, bundle: Bundle) -> dict:
    golden = load_golden(bundle)
    with Converter.load(bundle.path, backend="torch", device=device) as on_device, \
            Converter.load(bundle.path, backend="torch", device="cpu") as on_cpu:
        got, reference = run_golden(on_device, golden), run_golden(on_cpu, golden)
        backend = on_device.backend_info.detail
    import torch  # the torch backend turned TF32 off on CUDA (strict_fp32): parity at 1e-4 needs it off

    tf32 = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    diffs = {name: float(np.max(np.abs(got[name] - reference[name]))) for name in reference}
    within_golden, golden_errors, _ = compare("fp32", got, golden)
    tf32_on = device.startswith("cuda") and any(tf32.values())
    ok = max(diffs.values()) <= PARITY_TARGET and within_golden and not tf32_on
    return {"status": "ok" if ok else "FAILED", "target": PARITY_TARGET, "tf32": tf32, "max_abs_diff_vs_cpu_fp32": diffs,
            "max_abs_diff_vs_golden": golden_errors, "glyph_pairs": golden.count, "backend": backend}


def glyphs(bundle: Bundle, count: int) -> np.ndarray:
    return load_golden(bundle).arrays["q"][:count, 0]  # real glyphs from the test alphabets


def seeds(device: str, bundle: Bundle, size: dict) -> dict:
    images, n = glyphs(bundle, size["seed_images"]), size["seed_n"]
    with Converter.load(bundle.path, backend="torch", device=device) as converter:
        first, second = converter.convert(images, n=n, seed=7), converter.convert(images, n=n, seed=7)
        other = converter.convert(images, n=n, seed=8)
        default_batch = converter.max_batch
    with Converter.load(bundle.path, backend="torch", device=device, max_batch=size["rebatch"]) as small:
        rebatched = small.convert(images, n=n, seed=7)
    identical = bool(np.array_equal(first, second))
    across = float(np.max(np.abs(first - rebatched)))
    ok = identical and across <= 1e-5 and not np.array_equal(first, other)
    return {"status": "ok" if ok else "FAILED", "same_seed_identical": identical,
            f"max_abs_diff_max_batch_{default_batch}_vs_{size['rebatch']}": across,
            "different_seed_differs": not np.array_equal(first, other), "samples": len(images) * n}


def threads(device: str, bundle: Bundle, size: dict) -> dict:
    images, n, iterations = glyphs(bundle, size["thread_images"]), size["thread_n"], size["thread_iters"]
    with Converter.load(bundle.path, backend="torch", device=device) as converter:
        alone = {seed: converter.convert(images, n=n, seed=seed) for seed in range(THREADS)}
        mismatches, errors = [], []

        def work(seed: int) -> None:
            try:
                for _ in range(iterations):
                    if not np.array_equal(converter.convert(images, n=n, seed=seed), alone[seed]):
                        mismatches.append(seed)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(f"{type(err).__name__}: {err}")

        workers = [threading.Thread(target=work, args=(seed,)) for seed in range(THREADS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    ok = not mismatches and not errors
    return {"status": "ok" if ok else "FAILED", "threads": THREADS, "calls": THREADS * iterations,
            "mismatching_seeds": sorted(set(mismatches)), "errors": errors[:5]}


def interleaved(contenders: dict[str, Callable[[], Any]], sync, rounds: int, calls: int) -> dict[str, list[float]]:
    """ms per call of each contender, `calls` calls per round, contenders taking turns."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up (and CUDA graph capture) outside the timing
        for _ in range(3):
            fn()
        sync()
    for _ in range(rounds):
        for name, fn in contenders.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3 / calls)
    return times


def latency(device: str, bundle: Bundle, size: dict) -> dict:
    import torch

    from vce_deploy.checkpoint import load_model

    sync = _sync(torch, device)
    model, _ = load_model(bundle.checkpoint)
    eager = model.to(device).eval()
    rows = []
    with Converter.load(bundle.path, backend="torch", device=device) as converter:
        engine = converter.backend
        rng = np.random.default_rng(0)
        for batch in size["batches"]:
            q = torch.from_numpy(np.repeat(glyphs(bundle, 1)[:, None], batch, axis=0)).to(device)
            z = torch.from_numpy(rng.standard_normal((batch, converter.latent_dim), dtype=np.float32)).to(device)
            condition = glyphs(bundle, 1)

            def eager_call():
                with torch.inference_mode():
                    return eager.convertor(z, q)

            contenders = {
                "eager CUDA PyTorch (model.convertor)" if device.startswith("cuda") else "eager PyTorch": eager_call,
                "Converter engine (CUDA graph)" if device.startswith("cuda") else "Converter engine":
                    lambda: engine._run_tensors("convertor", {"z": z, "q": q}),
                "Converter.convert end to end (noise, gather, copy back)":
                    lambda: converter.convert(condition, n=batch, seed=0),
            }
            times = interleaved(contenders, sync, size["rounds"], calls=size["calls"] if batch <= 64 else 2)
            for name, ms in times.items():
                median = float(np.median(ms))
                rows.append({"batch": batch, "contender": name, "median_ms": round(median, 4),
                             "min_ms": round(min(ms), 4), "max_ms": round(max(ms), 4), "rounds": len(ms),
                             "samples_per_s": round(batch / median * 1e3, 1)})
    return {"status": "ok", "rows": rows, "timing": "wall clock per call, synchronised before and after each "
            "round; device-resident inputs for the first two, host glyph in / host array out for convert()"}


def tensorrt(device: str, bundle: Bundle) -> dict:
    try:
        import tensorrt as trt
    except ImportError:
        return {"status": "skipped: not installed"}
    if not device.startswith("cuda"):
        return {"status": "skipped: needs a CUDA device"}
    from vce_deploy.engine_build import build_engines
    from vce_deploy.golden import verify_golden

    cache = Path(tempfile.mkdtemp(prefix="vce_engines_"))
    import os

    os.environ["VCE_ENGINE_CACHE"] = str(cache)
    build_engines(bundle.path, "fp16", 1, 64, 256, device=int(device.partition(":")[2] or 0), log=lambda _: None)
    results = [r for r in verify_golden(bundle, load_golden(bundle)) if r.backend == "tensorrt"]
    ok = all(r.status in ("ok",) or r.status.startswith("skipped") for r in results)
    return {"status": "ok" if ok else "FAILED", "tensorrt": trt.__version__, "golden": [r.line() for r in results]}


def onnxruntime_gpu(device: str, bundle: Bundle) -> dict:
    try:
        import onnxruntime
    except ImportError:
        return {"status": "skipped: not installed"}
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return {"status": "skipped: not installed (onnxruntime-gpu)"}
    golden = load_golden(bundle)
    with Converter.load(bundle.path, backend="onnxruntime", device=device) as converter:
        ok, errors, why = compare("fp32", run_golden(converter, golden), golden)
        detail = converter.backend_info.detail
    return {"status": "ok" if ok else "FAILED", "max_abs_diff_vs_golden": errors, "why": why, "backend": detail}


def markdown(report: dict) -> str:
    env = report["sections"].get("environment", {})
    lines = [f"# GPU check ({report['device']})", "",
             f"Command: `{report['command']}`; GPU: {env.get('gpu', 'none (dry mode on the CPU)')}; "
             f"CPU: {env.get('cpu', '?')}; torch {env.get('torch', '?')}, CuPy {env.get('cupy', '?')}, "
             f"TensorRT {env.get('tensorrt', '?')}, onnxruntime {env.get('onnxruntime', '?')}.", "",
             "| section | result | detail |", "|---|---|---|"]
    for name, result in report["sections"].items():
        detail = {k: v for k, v in result.items() if k not in ("status", "rows", "seconds")}
        lines.append(f"| {name} | {result['status']} | {json.dumps(detail, default=str)[:300]} |")
    rows = report["sections"].get("latency", {}).get("rows", [])
    if rows:
        lines += ["", "| batch | contender | median ms | min..max ms | samples/s |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['batch']} | {r['contender']} | {r['median_ms']:.3f} | {r['min_ms']:.3f}..{r['max_ms']:.3f} "
                  f"| {r['samples_per_s']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda:0", help="cuda[:N], or cpu for the dry mode")
    parser.add_argument("--quick", action="store_true", help="a few samples per section (the suite's dry run)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this")
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the shipped bundle)")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to PyTorch; `--device cpu` runs the dry mode", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        from vce_deploy.backends.torch import strict_fp32

        strict_fp32(torch)  # before any section: every fp32 figure here is true fp32, not TF32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.load(args.bundle or DEFAULT_BUNDLE)
    check = Check(out, args.budget_s, {"command": "python -m bench.gpu_check " + " ".join(argv or sys.argv[1:]),
                                       "device": args.device, "bundle": str(bundle.path)})
    device = args.device
    size = QUICK if args.quick else FULL
    check.section("environment", lambda: environment(device))
    check.section("parity", lambda: parity(device, bundle))
    check.section("seeds", lambda: seeds(device, bundle, size))
    check.section("threads", lambda: threads(device, bundle, size))
    check.section("latency", lambda: latency(device, bundle, size))
    check.section("tensorrt", lambda: tensorrt(device, bundle))
    check.section("onnxruntime_gpu", lambda: onnxruntime_gpu(device, bundle))
    failed = [name for name, r in check.report["sections"].items() if r["status"] == "FAILED"]
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
