"""Where engines built on a device live: a cache keyed by TensorRT version and GPU, outside
the bundle, so a read-only or shared bundle still gets engines (docs/edge.md).

    $VCE_ENGINE_CACHE (default ~/.cache/vce_deploy/engines)/
      trt-10.3.0/nvidia-jetson-agx-orin-sm87/
        timing.cache                                   one per TensorRT version and GPU
        onnx-<sha256 of the ONNX file>/convertor.fp16.plan  + convertor.fp16.json (its record)
      trt-10.x/...           version-compatible engines (a later 10.x, or the next major: 10 -> 11)
      .../ampere-plus-x86_64/...  hardware-compatible engines (any GPU of compute capability >= 8.0
                             on the same platform: an x86_64 plan never runs on an aarch64 Jetson)

An engine is keyed by the sha256 of the ONNX file it was built from, so two bundles with the
same graph share it and an engine can never be used for another graph. Its record holds the
plan's own sha256, checked when it is read, and what it was built for (bundle.EngineInfo).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from .bundle import EngineInfo, _parse_engine
from .errors import BackendError, BundleError
from .fsio import atomic_write_bytes

CACHE_ENV = "VCE_ENGINE_CACHE"
HARDWARE_COMPATIBLE_KEY = "ampere-plus"  # TensorRT's AMPERE_PLUS level: compute capability 8.0 and newer
HARDWARE_COMPATIBLE_MIN_CAPABILITY = (8, 0)
# Version compatibility (TensorRT docs, "Version Compatibility"): from 8.6, a plan runs on the
# TensorRT that built it and later releases of that major; across majors only 8 -> 9, 8 -> 10,
# 9 -> 10 and 10 -> 11. Build major -> the runtime majors that may load it.
VERSION_COMPATIBLE_MAJORS = {8: (8, 9, 10), 9: (9, 10), 10: (10, 11), 11: (11,)}
VERSION_COMPATIBLE_MIN = (8, 6)


def version_compatible_runs(built: str, runtime: str) -> bool:
    """Whether a version-compatible plan built by TensorRT `built` may load on `runtime`."""
    b, r = _version(built), _version(runtime)
    return b >= VERSION_COMPATIBLE_MIN and b <= r and r[0] in VERSION_COMPATIBLE_MAJORS.get(b[0], ())


def hardware_key(machine: str | None = None) -> str:
    """The folder of hardware-compatible plans: TensorRT plans are not portable across
    platforms (x86_64 against aarch64 Jetson / SBSA), so the platform is part of the key."""
    machine = machine or platform.machine() or "unknown"
    return f"{HARDWARE_COMPATIBLE_KEY}-{re.sub(r'[^a-z0-9_]+', '-', machine.lower())}"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vce_deploy" / "engines"


def gpu_key(gpu_name: str, capability: str) -> str:
    """"NVIDIA Jetson AGX Orin", "8.7" -> "nvidia-jetson-agx-orin-sm87"."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    return f"{slug}-sm{capability.replace('.', '')}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def target_dir(root: Path, trt_version: str, gpu_name: str, capability: str,
               version_compatible: bool = False, hardware_compatible: bool = False,
               machine: str | None = None) -> Path:
    trt = f"trt-{_version(trt_version)[0]}.x" if version_compatible else f"trt-{trt_version}"
    gpu = hardware_key(machine) if hardware_compatible else gpu_key(gpu_name, capability)
    return Path(root) / trt / gpu


def timing_cache_path(root: Path, trt_version: str, gpu_name: str, capability: str) -> Path:
    """Timing caches are only valid for the TensorRT version and GPU that measured them."""
    return target_dir(root, trt_version, gpu_name, capability) / "timing.cache"


def compatibility_problem(info: EngineInfo, trt_version: str, gpu_name: str, capability: str) -> str | None:
    """Why an engine built as `info` cannot run on this TensorRT and GPU, or None."""
    same_version = info.tensorrt_version == trt_version
    # version-compatible plans run on a later TensorRT only within the allowed major pairs
    later = info.version_compatible and version_compatible_runs(info.tensorrt_version, trt_version)
    same_gpu = info.compute_capability == capability
    ampere_plus = info.hardware_compatible and _capability(capability) >= HARDWARE_COMPATIBLE_MIN_CAPABILITY
    if (same_version or later) and (same_gpu or ampere_plus):
        return None
    return (f"built for TensorRT {info.tensorrt_version} on compute capability {info.compute_capability} "
            f"({info.gpu_name or 'unnamed GPU'}); this is TensorRT {trt_version} on {gpu_name} "
            f"(compute capability {capability})")


@dataclass(frozen=True)
class CachedEngine:
    plan: Path
    sha256: str
    info: EngineInfo

    def read_verified(self) -> bytes:
        data = self.plan.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.sha256:
            raise BackendError(f"{self.plan}: sha256 {actual[:16]}... but its record says {self.sha256[:16]}...: "
                               "the cached engine was changed or cut short; rebuild it with `vce build`")
        return data


def _names(role: str, precision: str) -> tuple[str, str]:
    return f"{role}.{precision}.plan", f"{role}.{precision}.json"


def plan_path(target: Path, onnx_sha256: str, role: str, precision: str) -> Path:
    return Path(target) / f"onnx-{onnx_sha256}" / _names(role, precision)[0]


def store(target: Path, onnx_sha256: str, role: str, precision: str, plan: bytes, info: EngineInfo) -> CachedEngine:
    """Write one engine and its record (each atomically: a killed build leaves no half file)."""
    folder = Path(target) / f"onnx-{onnx_sha256}"
    plan_name, record_name = _names(role, precision)
    digest = hashlib.sha256(plan).hexdigest()
    atomic_write_bytes(folder / plan_name, plan)
    record = {"sha256": digest, "onnx_sha256": onnx_sha256, "role": role, "precision": precision,
              "engine": info.to_dict()}
    atomic_write_bytes(folder / record_name, (json.dumps(record, indent=2) + "\n").encode())
    return CachedEngine(folder / plan_name, digest, info)


def lookup(root: Path, onnx_sha256: str, role: str, precision: str, trt_version: str,
           gpu_name: str, capability: str, machine: str | None = None) -> tuple[CachedEngine | None, list[str]]:
    """The first cached engine of this graph that runs here (exact build first, then the
    compatible kinds), and the reasons the others found do not."""
    rejected = []
    exact = f"trt-{trt_version}"
    # version-compatible builds of this major first, then of the earlier majors allowed to load here
    runtime_major = _version(trt_version)[0]
    compatible = sorted((p.name for p in Path(root).glob("trt-*.x")
                         if runtime_major in VERSION_COMPATIBLE_MAJORS.get(_version(p.name)[0], ())),
                        key=lambda name: -_version(name)[0])
    gpus = [gpu_key(gpu_name, capability), hardware_key(machine)]
    for trt_dir in [exact, *compatible]:
        for gpu_dir in gpus:
            folder = Path(root) / trt_dir / gpu_dir / f"onnx-{onnx_sha256}"
            plan_name, record_name = _names(role, precision)
            try:
                record = json.loads((folder / record_name).read_text())
                info = _parse_engine(record.get("engine"), str(folder / record_name))
                sha = record["sha256"]
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, AttributeError, TypeError, BundleError) as err:
                rejected.append(f"{folder / record_name}: unreadable record ({err})")
                continue
            problem = compatibility_problem(info, trt_version, gpu_name, capability)
            if problem is not None:
                rejected.append(f"{folder / plan_name}: {problem}")
                continue
            return CachedEngine(folder / plan_name, sha, info), rejected
    return None, rejected


def built_elsewhere(root: Path, onnx_sha256: str, role: str, precision: str) -> list[str]:
    """The cache keys ("trt-10.3.0/nvidia-...-sm87") holding an engine of this graph, for messages."""
    record = _names(role, precision)[1]
    return sorted(str(p.parent.parent.relative_to(root)) for p in Path(root).glob(f"*/*/onnx-{onnx_sha256}/{record}"))
