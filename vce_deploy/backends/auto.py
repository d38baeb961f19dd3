"""What backend="auto" and precision="auto" pick, and why (`conv.backend_info.reason`).

The order is measured, not assumed (docs/cpu_inference.md: interleaved runs of every backend
and precision on the same inputs): on a GPU a TensorRT engine built for it, then ONNX Runtime
on its GPU providers; on a CPU the rule follows the flags this CPU reports at run time:
- native bf16 (AMX-BF16 or AVX512-BF16): OpenVINO bf16, the fastest measured there;
- native int8 dot products (AMX-INT8, AVX512-VNNI or AVX-VNNI): OpenVINO int8, then ONNX
  Runtime int8, on the bundle's CPU int8 form (uint8 activations);
- then fp32: ONNX Runtime (level with OpenVINO fp32 within the noise, and installed everywhere).
A reduced precision is taken only when the bundle's manifest states its NLL cost against fp32
(paired, same targets and noise) and that cost is at most MAX_AUTO_NLL_COST nats. An explicit
precision is never swapped for another: it runs, or the error says what is available.
"""
from __future__ import annotations

import re

from ..bundle import Bundle
from ..contract import RUN_PRECISIONS
from ..cpu import CpuInfo, this_cpu
from ..errors import BackendError
from .base import Backend

MAX_AUTO_NLL_COST = 0.5  # nats per target: what precision="auto" may give up for speed
# backend order per explicit precision on a CPU, fastest first (docs/cpu_inference.md)
CPU_ORDER = {"fp32": ("onnxruntime", "openvino"), "bf16": ("openvino",), "fp16": ("onnxruntime",),
             "int8": ("openvino", "onnxruntime")}
# torch last on a GPU: eager with CUDA graphs, slower than an engine but far faster than the
# CPU, and the one GPU path on a machine with CUDA PyTorch but no TensorRT or onnxruntime-gpu
GPU_ORDER = ("tensorrt", "onnxruntime", "torch")


def nll_cost(bundle: Bundle, precision: str, consumer: str = "cpu") -> float | None:
    """The manifest's paired NLL cost of `precision` against fp32 in nats, or None if not measured.
    int8 has one figure per file form; the CPU form is what CPU backends run."""
    measured = bundle.manifest.metrics.get("nll", {})
    for key in (f"{precision}-{consumer}", precision):
        cost = measured.get(key, {}).get("cost_vs_fp32") if isinstance(measured.get(key), dict) else None
        if isinstance(cost, (int, float)):
            return float(cost)
    return 0.0 if precision == "fp32" else None


def cpu_plan(bundle: Bundle, cpu: CpuInfo) -> tuple[list[tuple[str, str]], list[str]]:
    """(backend, precision) pairs precision="auto" tries on this CPU, and why others are left out."""
    plan, notes = [], []
    for precision, native, what in (("bf16", cpu.native_bf16, "native bf16 (amx_bf16 / avx512_bf16)"),
                                    ("int8", cpu.native_int8, "native int8 (amx_int8 / avx512_vnni / avx_vnni)")):
        cost = nll_cost(bundle, precision)
        if not native:
            notes.append(f"{precision} left out: this CPU has no {what}")
        elif cost is None:
            notes.append(f"{precision} left out: the manifest states no NLL cost for it")
        elif cost > MAX_AUTO_NLL_COST:
            notes.append(f"{precision} left out: NLL cost {cost:+.3f} nats > {MAX_AUTO_NLL_COST}")
        else:
            plan += [(name, precision) for name in CPU_ORDER[precision]]
            notes.append(f"{precision}: {what}, NLL cost {cost:+.3f} nats <= {MAX_AUTO_NLL_COST}")
    return plan + [(name, "fp32") for name in CPU_ORDER["fp32"]], notes


def cpu_candidates(backends: dict[str, type[Backend]], bundle: Bundle,
                   cpu: CpuInfo) -> tuple[list[tuple[type[Backend], str]], list[str]]:
    """Every CPU (backend class, precision) that measuring may time: usable here, with a stated NLL
    cost within MAX_AUTO_NLL_COST; the flag plan's order first, so a spent budget cuts the least
    likely. Whatever the flags say: measuring, not the table, decides among these."""
    plan, notes = cpu_plan(bundle, cpu)
    for precision in ("int8", "bf16", "fp16"):
        cost = nll_cost(bundle, precision)
        if cost is not None and cost <= MAX_AUTO_NLL_COST:
            plan += [(name, precision) for name in CPU_ORDER[precision] if (name, precision) not in plan]
    found = []
    for name, precision in plan:
        if name in backends and refusal(backends, backends[name], bundle, precision, "cpu") is None:
            found.append((backends[name], precision))
    return found, notes


def choose(backends: dict[str, type[Backend]], bundle: Bundle, backend: str, precision: str,
           device: str | None) -> tuple[type[Backend], str, str]:
    """(backend class, precision, reason), or the BackendError that says what is available."""
    if backend != "auto":
        cls = backends[backend]
        problem = refusal(backends, cls, bundle, precision, device)
        if problem is not None:
            raise problem
        if precision == "auto":
            raise BackendError(f"precision='auto' picks the backend too: expected backend='auto' with it, or an "
                               f"explicit precision for {backend} (one of {list(cls.precisions)})")
        return cls, precision, f"backend={backend!r} was requested"
    plan: list[tuple[str, str]] = []
    notes: list[str] = []
    on_cpu_only = device is not None and not device.startswith("cuda")
    gpu_precisions = ("fp32",) if precision == "auto" else (precision,)
    if not on_cpu_only:  # ONNX Runtime and torch take a GPU place only where they see a GPU
        gpu = [name for name in GPU_ORDER if name in backends
               and (name == "tensorrt" or backends[name].resolve_device(device).startswith("cuda"))]
        plan += [(name, p) for p in gpu_precisions for name in gpu]
    if device is None or not device.startswith("cuda"):
        if precision == "auto":
            cpu_pairs, notes = cpu_plan(bundle, this_cpu())
        else:
            cpu_pairs = [(name, precision) for name in CPU_ORDER.get(precision, ())]
        plan += [pair for pair in cpu_pairs if pair[0] in backends and pair not in plan]
    skipped: list[str] = []
    problem: BackendError | None = None
    for name, run_precision in plan:
        cls = backends[name]
        problem = refusal(backends, cls, bundle, run_precision, device)
        if problem is None:
            why = f"auto picked {name} {run_precision}, the first usable of {[f'{n} {p}' for n, p in plan]}"
            details = [*notes, *skipped]
            return cls, run_precision, why + (f" ({'; '.join(details)})" if details else "") + \
                (f" on {this_cpu().describe()}" if not cls.resolve_device(device).startswith("cuda") else "")
        skipped.append(f"{name} skipped at {run_precision}: {problem}")
    if problem is None:
        raise BackendError(f"no backend runs precision {precision!r} on device {device!r}")
    raise BackendError("auto found nothing usable: " + "; ".join(skipped))


def refusal(backends: dict[str, type[Backend]], cls: type[Backend], bundle: Bundle, precision: str,
            device: str | None) -> BackendError | None:
    """Why `cls` cannot run `precision` on `device` (naming what can), or None."""
    if device is not None and not re.fullmatch(cls.device_names, device):
        takers = [name for name, other in backends.items() if re.fullmatch(other.device_names, device)]
        return BackendError(f"{cls.name} does not run on device {device!r}; backends for it: {takers}")
    if precision != "auto" and precision not in cls.precisions:
        runners = [name for name, other in backends.items() if precision in other.precisions]
        return BackendError(f"{cls.name} runs precisions {list(cls.precisions)}, not {precision!r}; "
                            f"{precision} is run by {runners}")
    return cls.unavailable(bundle, precision if precision != "auto" else "fp32", device)


__all__ = ["CPU_ORDER", "GPU_ORDER", "MAX_AUTO_NLL_COST", "RUN_PRECISIONS", "choose", "cpu_candidates", "cpu_plan", "nll_cost"]
