"""Interleaved timing: every contender once per round, several rounds, so a neighbour's load
(this machine is shared) hits all of them alike. A round gives each contender a slice of
`seconds / rounds`; the per-round rate is what the median and spread are taken over."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class Cell:
    """The timed calls of one contender at one batch size: per-call times and per-round rates."""

    batch: int
    times_ns: list[int] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)  # images/s in each round
    first_call_s: float | None = None

    def stats(self) -> dict[str, float]:
        ms = np.asarray(self.times_ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        rates = np.asarray(self.round_rates)
        return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "calls": int(len(ms)),
                "images_per_s": float(np.median(rates)), "images_per_s_min": float(rates.min()),
                "images_per_s_max": float(rates.max()), "rounds": int(len(rates))}


def warm_up(fn: Callable[[], Any], seconds: float, calls: int = 3) -> float:
    """At least `calls` calls and `seconds`; returns the first call's time (compilation, caches)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    done = 1
    while done < calls or time.perf_counter() - start < seconds:
        fn()
        done += 1
    return first


def time_slice(fn: Callable[[], Any], seconds: float, min_calls: int, cell: Cell) -> None:
    """Call fn for `seconds` (at least min_calls times), the garbage collector off inside."""
    gc.collect()
    gc.disable()
    try:
        end = time.perf_counter() + seconds
        spent, done = 0, 0
        while done < min_calls or time.perf_counter() < end:
            start = time.perf_counter_ns()
            fn()
            elapsed = time.perf_counter_ns() - start
            cell.times_ns.append(elapsed)
            spent += elapsed
            done += 1
    finally:
        gc.enable()
    cell.round_rates.append(cell.batch * done / (spent / 1e9))


def interleave(contenders: dict[str, Callable[[], Any]], batch: int, seconds: float, rounds: int,
               min_calls: int = 3) -> dict[str, Cell]:
    """Time already warmed-up contenders in `rounds` rounds; the order rotates each round so no
    contender always follows the same neighbour."""
    cells = {name: Cell(batch) for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            time_slice(contenders[name], seconds / rounds, min_calls, cells[name])
    return cells
