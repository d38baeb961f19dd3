"""Records (one per peer and batch), the issue's targets checked against them, and the
markdown table the README's "Speed" section is regenerated from."""
from __future__ import annotations

from typing import Any

import numpy as np

from .peers import BASELINE, REFERENCE_RUNTIME, Peer

MAX_NLL_COST = 0.5  # nats: the targets' bound on what a faster precision may cost


def records(peers: list[Peer], batches, result: dict, flops: float, peak_gflops: float) -> list[dict]:
    cells, outputs = result["cells"], result["outputs"]
    rows = []
    for peer in peers:
        base = {"id": peer.id, "family": peer.family, "precision": peer.precision, "detail": peer.detail,
                "nll_cost": peer.nll_cost, "skipped": peer.reason, "chosen": peer.chosen}
        for batch in batches:
            engine = cells.get((peer.id, batch, "engine"))
            if engine is None or not engine.times_ns:
                continue
            row = {**base, "skipped": None, "batch": batch, **engine.stats(), "first_call_s": engine.first_call_s}
            convert = cells.get((peer.id, batch, "convert"))
            if convert is not None and convert.times_ns:
                row.update({f"convert_{k}": v for k, v in convert.stats().items()})
                row["convert_overhead"] = row["convert_p50_ms"] / row["p50_ms"] - 1.0
            reference, mine = outputs.get((BASELINE, batch)), outputs.get((peer.id, batch))
            row["max_abs_err"] = None if reference is None or mine is None else float(np.abs(mine - reference).max())
            row["gflops"] = row["images_per_s"] * flops / 1e9
            row["share_of_peak"] = row["gflops"] / peak_gflops
            rows.append(row)
        if not any(r["id"] == peer.id for r in rows):
            rows.append({**base, "batch": None})
    for row in rows:
        if row["batch"] is None:
            continue
        same = [r for r in rows if r["batch"] == row["batch"]]
        ort = next((r for r in same if r["id"] == REFERENCE_RUNTIME), None)
        torch_best = max((r for r in same if r["family"] == "torch"), key=lambda r: r["images_per_s"], default=None)
        row["x_ort_fp32"] = row["images_per_s"] / ort["images_per_s"] if ort else None
        row["x_best_torch"] = row["images_per_s"] / torch_best["images_per_s"] if torch_best else None
        row["best_torch"] = torch_best["id"] if torch_best else None
    return rows


def targets(rows: list[dict], big: int = 64, small: int = 1) -> dict[str, Any]:
    """The issue's targets for Converter.convert with "auto", from this one run."""
    def find(peer_id, batch):
        return next((r for r in rows if r["id"] == peer_id and r["batch"] == batch), None)

    auto, ort = find("auto", big), find(REFERENCE_RUNTIME, big)
    out: dict[str, Any] = {}
    if auto and "convert_images_per_s" in auto:
        torch_rows = [r for r in rows if r["batch"] == big and r["family"] == "torch"]
        best = max(torch_rows, key=lambda r: r["images_per_s"], default=None)
        rate = auto["convert_images_per_s"]
        out["auto"] = auto["chosen"] + " (why: under Contenders)"
        if ort:
            out[f"batch {big}: auto convert / ONNX Runtime fp32 engine (>= 4)"] = rate / ort["images_per_s"]
        if best:
            out[f"batch {big}: auto convert / strongest PyTorch peer {best['id']} (>= 2)"] = rate / best["images_per_s"]
        out[f"auto NLL cost, nats (<= {MAX_NLL_COST})"] = auto["nll_cost"]
    auto1 = find("auto", small)
    if auto1 and "convert_p50_ms" in auto1:
        out[f"batch {small}: auto convert p50 ms (<= 1 on a quiet machine)"] = auto1["convert_p50_ms"]
        out[f"batch {small}: auto convert p50 / engine p50 - 1 (<= 0.10)"] = auto1["convert_overhead"]
    return out


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict], machine: dict, meta: dict, goals: dict) -> str:
    lines = [
        f"- CPU: {machine['cpu']}, {machine['physical_cores']} physical cores, flags {', '.join(machine['flags'])}; "
        f"{machine['threads']} threads per contender",
        f"- load average (1, 5, 15 min): start {_loads(machine['load_avg_start'])}, end "
        f"{_loads(machine.get('load_avg_end'))} (a shared machine: interleaved rounds, median and range of rounds)",
        f"- torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, openvino {machine['openvino']}, "
        f"numpy {machine['numpy']}, python {machine['python']}",
        f"- {meta['flops'] / 1e6:.1f} MFLOP per conversion; fp32 matmul peak {meta['peak_gflops']:.0f} GFLOP/s",
        f"- input: {meta['image']}; {meta['rounds']} rounds of {meta['seconds'] / meta['rounds']:.2f} s per "
        "contender; engine = the bare engine call on a ready batch, convert = Converter.convert(image, n=batch, "
        "seed=0) end to end (PNG decode and preprocessing included)",
        f"- command: `{meta['command']}`",
        "",
        "| contender | precision | batch | images/s (median) | range over rounds | p50 ms | x ORT fp32 | x best torch "
        "| convert images/s | convert p50 ms | convert overhead | NLL cost (nats) | max abs err vs eager |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        if r["batch"] is None:
            continue
        lines.append(
            f"| {r['id']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.0f} | {r['images_per_s_min']:.0f}"
            f"-{r['images_per_s_max']:.0f} | {r['p50_ms']:.3f} | {_f(r['x_ort_fp32'], '.2f')} | "
            f"{_f(r['x_best_torch'], '.2f')} | {_f(r.get('convert_images_per_s'), '.0f')} | "
            f"{_f(r.get('convert_p50_ms'), '.3f')} | {_f(_pct(r.get('convert_overhead')), '+.0f')}{'%' if r.get('convert_overhead') is not None else ''} | "
            f"{_f(r['nll_cost'], '+.3f')} | {_f(r['max_abs_err'], '.1e')} |")
    best = {r["batch"]: r["best_torch"] for r in rows if r["batch"] is not None and r.get("best_torch")}
    if best:
        lines += ["", "x best torch is against the strongest PyTorch peer of the same batch: " +
                  ", ".join(f"batch {b}: {peer}" for b, peer in best.items())]
    skipped = [r for r in rows if r["batch"] is None]
    if skipped:
        lines += ["", "Not run here: " + "; ".join(f"**{r['id']}**: {r['skipped']}" for r in skipped)]
    if goals:
        lines += ["", "Targets (issue 13), from this run:", ""]
        lines += [f"- {name}: {value:.3f}" if isinstance(value, float) else f"- {name}: {value}"
                  for name, value in goals.items()]
    details = {r["id"]: r["detail"] for r in rows if r["batch"] is not None}
    lines += ["", "Contenders: " + "; ".join(f"**{k}**: {v}" for k, v in details.items())]
    return "\n".join(lines) + "\n"


def _pct(value):
    return None if value is None else 100 * value


def _loads(loads) -> str:
    return "-" if loads is None else ", ".join(f"{x:.2f}" for x in loads)
