"""One benchmark run: every peer at every batch size, warmed up, then timed in interleaved
rounds on the same inputs; outputs kept for the error column."""
from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from vce_deploy import preprocess_batch
from vce_deploy.backends import HostLatentSampler

from .peers import SEED, Peer
from .timing import Cell, interleave, warm_up

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"  # DESIGN.md "Data"


def condition_image() -> tuple[Any, str]:
    """A raw 105x105 Omniglot test-alphabet PNG (bytes) when the data is there, else a drawn one."""
    for path in sorted(OMNIGLOT.glob("images_background_small*.zip")):
        try:
            with zipfile.ZipFile(path) as archive:
                names = sorted(n for n in archive.namelist() if "/Tagalog/" in n and n.endswith(".png"))
                if names:
                    return archive.read(names[0]), f"Omniglot {names[0]} ({path.name}), PNG bytes, 105x105"
        except (OSError, zipfile.BadZipFile):
            continue
    image = np.full((105, 105), 255, np.uint8)
    image[20:85, 48:56] = 0
    image[48:56, 20:85] = 0
    return image, "a drawn 105x105 cross (Omniglot zips not found)"


def engine_inputs(image: Any, batch: int, latent_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Exactly what `Converter.convert(image, n=batch, seed=SEED)` hands the engine."""
    q = np.repeat(preprocess_batch(image), batch, axis=0)  # (b, 1, 28, 28)
    z = HostLatentSampler(SEED).draw(batch, latent_dim, 1.0)  # (b, 56)
    return z, q


def run(peers: list[Peer], batches, seconds: float, rounds: int, warmup: float, image: Any, latent_dim: int,
        log=print) -> dict:
    """-> {"cells": {(peer id, batch, "engine" | "convert"): Cell}, "outputs": {(id, batch): y}}"""
    cells: dict[tuple[str, int, str], Cell] = {}
    outputs: dict[tuple[str, int], np.ndarray] = {}
    for batch in batches:
        z, q = engine_inputs(image, batch, latent_dim)
        contenders, first = {}, {}
        for peer in peers:
            if peer.reason is not None:
                continue
            calls = {"engine": lambda p=peer: p.engine(z, q)}
            if peer.convert is not None:
                calls["convert"] = lambda p=peer: p.convert(image, batch)
            try:
                if peer.warm is not None:
                    peer.warm(z, q)
                start = time.perf_counter()
                outputs[(peer.id, batch)] = np.array(peer.engine(z, q), copy=True)
                first[(peer.id, "engine")] = time.perf_counter() - start
                for kind, fn in calls.items():
                    seconds_first = warm_up(fn, warmup)
                    first.setdefault((peer.id, kind), seconds_first)
            except Exception as err:  # noqa: BLE001 - a peer failing here is reported, not fatal
                peer.reason = f"failed at batch {batch}: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
                log(f"  {peer.id}: {peer.reason}")
                continue
            contenders.update({(peer.id, kind): fn for kind, fn in calls.items()})
        timed = interleave(contenders, batch, seconds, rounds)
        for (peer_id, kind), cell in timed.items():
            cell.first_call_s = first.get((peer_id, kind))
            cells[(peer_id, batch, kind)] = cell
        ran = len({peer_id for peer_id, _ in contenders})  # a peer's engine and convert calls are one contender
        log(f"  batch {batch}: {ran} contenders x {rounds} rounds done")
    return {"cells": cells, "outputs": outputs}
