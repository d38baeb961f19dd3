"""Where Converter.convert's time goes at batch 1, beside the bare engine call, each step
timed alone in interleaved rounds (the batch-1 path: docs/cpu_inference.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vce_deploy import Converter, preprocess_batch
from vce_deploy.backends import HostLatentSampler

from .peers import SEED
from .run import engine_inputs
from .timing import interleave, warm_up


def batch1_steps(bundle: Path, threads: int, image: Any, seconds: float = 2.0, rounds: int = 8) -> str:
    conv = Converter.load(bundle, precision="auto", threads=threads)
    engine, latent = conv.backend, conv.latent_dim
    glyph = preprocess_batch(image)[0, 0]  # (28, 28) float32 {0, 1}: what an app holding arrays passes
    z, q = engine_inputs(image, 1, latent)
    steps = {
        "engine.run (bare)": lambda: engine.run("convertor", {"z": z, "q": q}),
        "Converter.convert(PNG bytes, n=1)": lambda: conv.convert(image, n=1, seed=SEED),
        "Converter.convert(28x28 float32 array, n=1)": lambda: conv.convert(glyph, n=1, seed=SEED),
        "preprocess_batch(PNG bytes)": lambda: preprocess_batch(image),
        "preprocess_batch(28x28 array)": lambda: preprocess_batch(glyph),
        "HostLatentSampler(seed).draw(1, 56)": lambda: HostLatentSampler(SEED).draw(1, latent, 1.0),
    }
    for fn in steps.values():
        warm_up(fn, 0.2)
    cells = interleave(steps, 1, seconds, rounds, min_calls=20)
    lines = ["", f"Batch 1 step by step ({conv.backend.name} {conv.precision}, median of every call, ms):", "",
             "| step | p50 ms |", "|---|---|"]
    lines += [f"| {name} | {np.median(cell.times_ns) / 1e6:.3f} |" for name, cell in cells.items()]
    return "\n".join(lines) + "\n"


def shared_converter(bundle: Path, threads: int, image: Any, callers: int = 4, calls: int = 200, batch: int = 1,
                     rounds: int = 4) -> str:
    """One Converter shared by `callers` threads: the backend's pool of infer requests (calls run
    side by side) against one lock around the engine (calls run one at a time), in rounds."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    conv = Converter.load(bundle, precision="auto", threads=threads)
    engine, lock = conv.backend, threading.Lock()
    pooled_run = engine.run

    def locked_run(model, inputs):
        with lock:
            return pooled_run(model, inputs)

    rates: dict[str, list[float]] = {"pool of infer requests": [], "one lock around the engine": []}
    with ThreadPoolExecutor(callers) as workers:
        for _ in range(rounds):
            for name, run in (("pool of infer requests", pooled_run), ("one lock around the engine", locked_run)):
                engine.run = run  # instance attribute: only this benchmark's Converter sees it
                list(workers.map(lambda s: conv.convert(image, n=batch, seed=s), range(callers)))  # warm
                start = time.perf_counter()
                list(workers.map(lambda s: conv.convert(image, n=batch, seed=s), range(calls)))
                rates[name].append(calls * batch / (time.perf_counter() - start))
    engine.run = pooled_run
    lines = ["", f"One Converter ({conv.backend.name} {conv.precision}) shared by {callers} threads, batch {batch}, "
             f"{calls} calls per round, {rounds} rounds (images/s, median and range):", "",
             "| engine access | images/s | range |", "|---|---|---|"]
    lines += [f"| {name} | {np.median(r):.0f} | {min(r):.0f}-{max(r):.0f} |" for name, r in rates.items()]
    return "\n".join(lines) + "\n"
