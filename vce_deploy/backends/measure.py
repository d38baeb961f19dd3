"""precision="auto" by measurement, as TensorRT picks tactics: at the first load of a bundle on a
machine, every usable CPU (backend, precision) whose manifest NLL cost is within the bound is
timed on the bundle's golden inputs at batch 1 and at LARGE_BATCH, within BUDGET_S in all; the
fastest at LARGE_BATCH wins. The table is cached under $XDG_CACHE_HOME/vce_deploy/auto/, keyed by
the CPU model and flags, the bundle's manifest sha256, the library versions and the thread
count; a cache that is corrupt or was written for another key is measured again and rewritten
(atomically), never trusted. `Converter.load(..., measure=False)` or VCE_AUTO_MEASURE=0 skip
measuring: the flag table of backends/auto.py decides then (deterministic setups, tests).
docs/cpu_inference.md has the rule and what the figures it decides on are worth.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..cpu import CpuInfo, this_cpu
from ..errors import VCEError
from ..fsio import atomic_write_bytes, sha256_file
from .base import Backend, physical_cores

MEASURE_ENV = "VCE_AUTO_MEASURE"  # "0" / "false" / "no" / "off": skip measuring
BUDGET_S = 2.0  # what measuring may add to the first load (loads included)
LARGE_BATCH = 64
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Timing:
    """One candidate's measurement: batch-1 p50 and LARGE_BATCH images/s, or why none."""

    backend: str
    precision: str
    threads: int
    batch1_ms: float | None = None
    images_per_s: float | None = None  # at LARGE_BATCH
    note: str = ""  # why it was not measured

    def line(self) -> str:
        if self.images_per_s is None:
            return f"{self.backend} {self.precision} x{self.threads}: {self.note}"
        return (f"{self.backend} {self.precision} x{self.threads}: {self.images_per_s:.0f} images/s at batch "
                f"{LARGE_BATCH}, {self.batch1_ms:.3f} ms at batch 1")


def measuring_enabled(flag: bool | None) -> bool:
    """The load's flag if given, else the environment (measuring is the default)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(MEASURE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vce_deploy" / "auto"


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("vce-deploy", "numpy", "onnxruntime", "openvino"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def cache_key(bundle: Bundle, cpu: CpuInfo, threads: int, candidates: list[tuple[str, str]]) -> dict:
    """Everything a measured table depends on: any change means measuring again."""
    return {"format": CACHE_FORMAT, "cpu_model": cpu.model, "cpu_flags": sorted(cpu.flags),
            "bundle_sha256": sha256_file(bundle.path / "manifest.json"), "versions": _versions(),
            "threads": threads, "large_batch": LARGE_BATCH, "candidates": [list(c) for c in candidates]}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / f"{digest}.json"


def read_cache(path: Path, key: dict) -> tuple[list[Timing] | None, str]:
    """(table, "") from a cache written for exactly `key`, else (None, why it was not used)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "first load here: measured"
    except (OSError, ValueError) as err:
        return None, f"cache {path} unreadable ({type(err).__name__}): measured again"
    if not isinstance(raw, dict) or raw.get("key") != key:
        return None, f"cache {path} was written for another machine, bundle or version: measured again"
    try:
        table = [Timing(**row) for row in raw["table"]]
        for row in table:
            if row.images_per_s is not None and not (row.images_per_s > 0 and row.batch1_ms > 0):
                raise ValueError(row)
    except (KeyError, TypeError, ValueError) as err:
        return None, f"cache {path} malformed ({type(err).__name__}): measured again"
    return table, f"cache {path}"


def write_cache(path: Path, key: dict, table: list[Timing]) -> None:
    try:
        atomic_write_bytes(path, (json.dumps({"key": key, "table": [asdict(t) for t in table]}, indent=1) + "\n")
                           .encode())
    except OSError:  # a read-only home: measure again next time rather than fail the load
        pass


def _inputs(bundle: Bundle, rows: int) -> dict[str, np.ndarray]:
    """The golden (z, q) rows, repeated to `rows` (fixed random ones if the bundle has none)."""
    from ..golden_file import load_golden

    golden = load_golden(bundle)
    if golden is not None:
        z, q = golden.arrays["z"], golden.arrays["q"]
    else:
        rng = np.random.default_rng(0)
        size, latent = bundle.manifest.image_size, bundle.manifest.latent_dim
        z = rng.standard_normal((8, latent), dtype=np.float32)
        q = (rng.random((8, 1, size, size)) > 0.8).astype(np.float32)
    index = np.arange(rows) % z.shape[0]
    return {"z": np.ascontiguousarray(z[index]), "q": np.ascontiguousarray(q[index])}


class Deadline:
    """The budget as a hard bound. A library call cannot be stopped half way, so a step (a load, a
    warm call, a timed call) starts only if what it is expected to take still fits before the end:
    the longest such step seen so far, 0 for a kind of step not seen yet (the first candidate
    always gets to load). clock: time.perf_counter, or a fake one in tests."""

    def __init__(self, budget_s: float, clock=time.perf_counter):
        self.clock = clock
        self.budget_s = budget_s
        self.end = clock() + budget_s

    def left(self) -> float:
        return self.end - self.clock()

    def fits(self, expected_s: float, end: float | None = None) -> bool:
        """Whether a step expected to take expected_s ends by the budget's end (and by `end`)."""
        limit = self.end if end is None else min(self.end, end)
        return self.clock() + expected_s <= limit

    def timed(self, step, *args) -> float:
        """Run step(*args); its duration in seconds."""
        began = self.clock()
        step(*args)
        return self.clock() - began


def _median_ms(instance: Backend, feeds: dict, deadline: Deadline, share_end: float, expected_s: float,
               max_calls: int, at_least_one: bool) -> float | None:
    """Median of timed calls: two may run into the rest of the budget, more only within this
    candidate's share; None if not one call fits. at_least_one: the first candidate measured
    times one call even past the budget, because with no figure at all auto could not choose."""
    times: list[float] = []
    while len(times) < max_calls and ((at_least_one and not times) or deadline.fits(
            max(times, default=expected_s), None if len(times) < 2 else share_end)):
        times.append(deadline.timed(instance.run, "convertor", feeds))
    return float(np.median(times)) * 1e3 if times else None


def measure(candidates: list[tuple[type[Backend], str]], bundle: Bundle, threads: int,
            budget_s: float = BUDGET_S, clock=time.perf_counter) -> tuple[list[Timing], dict[tuple[str, str], Backend]]:
    """Time each candidate (load, warm calls, batch 1, LARGE_BATCH) within budget_s in all, counted
    from before the inputs are made: a step that is not expected to fit is not started (Deadline).
    Returns the table and the loaded instances (the caller keeps the winner, closes the rest)."""
    deadline = Deadline(budget_s, clock)
    small, large = _inputs(bundle, 1), _inputs(bundle, LARGE_BATCH)
    table, loaded = [], {}
    setup_s: dict[str, float] = {}  # backend name -> its longest load plus warm calls so far

    def skipped(cls, precision, what):
        return Timing(cls.name, precision, threads, note=f"not measured: the {budget_s:g} s budget was spent "
                                                         f"({max(0.0, deadline.left()):.2f} s left, {what})")

    for done, (cls, precision) in enumerate(candidates):
        expected = setup_s.get(cls.name, max(setup_s.values(), default=0.0))
        if not deadline.fits(expected):
            table.append(skipped(cls, precision, f"loading and warming up takes about {expected:.2f} s"))
            continue
        share_end = deadline.clock() + deadline.left() / (len(candidates) - done)
        try:
            began = deadline.clock()
            instance = cls(bundle, precision, "cpu", threads)
            try:
                warm_large = deadline.timed(instance.run, "convertor", large)  # graph compilation, allocations
                warm_small = deadline.timed(instance.run, "convertor", small)
                setup_s[cls.name] = max(setup_s.get(cls.name, 0.0), deadline.clock() - began)
                now = deadline.clock()
                first = not loaded
                batch1 = _median_ms(instance, small, deadline, now + (share_end - now) * 0.3, warm_small, 50, first)
                per_call = _median_ms(instance, large, deadline, share_end, warm_large, 10, first)
            except BaseException:
                instance.close()
                raise
        except (VCEError, RuntimeError, OSError, ValueError) as err:
            table.append(Timing(cls.name, precision, threads, note=f"failed: {type(err).__name__}: {err}"[:200]))
            continue
        if batch1 is None or per_call is None:
            instance.close()
            table.append(skipped(cls, precision, "not one timed call fitted"))
            continue
        loaded[(cls.name, precision)] = instance
        table.append(Timing(cls.name, precision, threads, round(batch1, 4), round(LARGE_BATCH / per_call * 1e3, 1)))
    return table, loaded


def fastest(table: list[Timing]) -> Timing | None:
    measured = [t for t in table if t.images_per_s is not None]
    return max(measured, key=lambda t: t.images_per_s, default=None)


def pick(candidates: list[tuple[type[Backend], str]], bundle: Bundle, threads: int | None,
         cpu: CpuInfo | None = None) -> tuple[type[Backend], str, str, Backend | None, list[Timing]]:
    """(class, precision, reason, loaded instance or None, table): the fastest candidate here,
    from the cache when it matches, else measured now (and cached)."""
    threads = threads or physical_cores()
    cpu = cpu or this_cpu()
    by_name = {(cls.name, precision): cls for cls, precision in candidates}
    key = cache_key(bundle, cpu, threads, list(by_name))
    path = cache_path(key)
    table, source = read_cache(path, key)
    loaded: dict[tuple[str, str], Backend] = {}
    if table is None:
        table, loaded = measure(candidates, bundle, threads)
        if fastest(table) is not None:
            write_cache(path, key, table)
    best = fastest(table)
    if best is None:
        raise VCEError("auto measured nothing that runs: " + "; ".join(t.line() for t in table))
    instance = loaded.pop((best.backend, best.precision), None)
    for other in loaded.values():
        other.close()
    reason = (f"auto measured {best.backend} {best.precision} fastest at batch {LARGE_BATCH} on {cpu.describe()} "
              f"({source}): " + "; ".join(t.line() for t in table))
    return by_name[(best.backend, best.precision)], best.precision, reason, instance, table


__all__ = ["BUDGET_S", "LARGE_BATCH", "MEASURE_ENV", "Deadline", "Timing", "cache_dir", "measure", "measuring_enabled", "pick"]
