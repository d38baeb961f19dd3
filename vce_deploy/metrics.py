"""The manifest's metrics, as lines a person reads (`vce inspect`), and the reported NLL record.

metrics["nll_reported"] is the figure the README reports, with its protocol (K, targets, split,
seed) beside it; metrics["nll"] is the export's own quick check on a subset with a small K, kept
so that precisions can be compared at export time. docs/export.md describes both.
"""
from __future__ import annotations

import json
import textwrap
from typing import Any

NLL_SECTIONS = {"nll_reported": "NLL, reported", "nll": "NLL, export-time check (not the reported figure)"}


LINE_WIDTH = 110  # inspect's lines stay readable in a terminal (tests/test_first_hour.py)


def _protocol(protocol: dict) -> tuple[str, list[tuple[str, str]]]:
    """(the short head: K, targets, split, seed, SE; the other fields as (key, value))."""
    parts = []
    if "k" in protocol:
        parts.append(f"K = {protocol['k']}")
    if "targets" in protocol:
        of = f" of {protocol['of']}" if protocol.get("of") not in (None, protocol["targets"]) else ""
        parts.append(f"{protocol['targets']}{of} targets")
    if protocol.get("split"):
        parts.append(f"{protocol['split']} split")
    if "seed" in protocol:
        parts.append(f"seed {protocol['seed']}")
    if protocol.get("standard_error"):
        parts.append(f"SE {protocol['standard_error']}")
    head = {"k", "targets", "of", "split", "seed", "standard_error"}
    details = [(key, _plain(value)) for key, value in protocol.items() if key not in head]
    return "; ".join(parts), details


def _detail_lines(key: str, value: str, indent: str) -> list[str]:
    """'key: value', wrapped to LINE_WIDTH; a command is kept on one line: it is copied, not read."""
    text = f"{indent}{key}: {value}"
    if key == "command":
        return [text]
    return textwrap.wrap(text, LINE_WIDTH, subsequent_indent=indent + "  ", break_on_hyphens=False)


def _nll_lines(title: str, section: dict) -> list[str]:
    head, details = _protocol(section.get("protocol", {}))
    lines = [f"{title}: {head}"]
    for key, value in details:
        lines += _detail_lines(key, value, "  ")
    rows = {precision: r for precision, r in section.items() if precision != "protocol" and isinstance(r, dict)}
    width = max([5, *map(len, rows)])
    for precision, r in rows.items():
        text = f"  {precision:<{width}} NLL {r.get('nll_mean', float('nan')):.2f} ± {r.get('nll_sem', float('nan')):.2f} nats"
        if "elbo_mean" in r:
            text += f", -ELBO {r['elbo_mean']:.2f} ± {r.get('elbo_sem', float('nan')):.2f}"
        if "cost_vs_fp32" in r:
            text += f", cost vs fp32 {r['cost_vs_fp32']:+.3f} ± {r.get('cost_vs_fp32_sem', float('nan')):.3f} (paired)"
        lines.append(text)
    return lines


def _parity_lines(section: dict) -> list[str]:
    """Parity records are backend -> precision -> record (bundles from round 1: precision -> record)."""
    lines = ["parity of the ONNX models against the checkpoint (at export):"]
    nested = all(isinstance(v, dict) and all(isinstance(r, dict) for r in v.values()) and "ok" not in v
                 for v in section.values())
    rows = ([(f"{precision} on {backend}", r) for backend, by_precision in section.items()
             for precision, r in by_precision.items()] if nested else list(section.items()))
    for label, r in rows:
        if not isinstance(r, dict):
            continue
        if r.get("ran") is False:
            lines.append(f"  {label}: not run ({r.get('ran_by') or 'no reason given'})")
            continue
        verdict = "ok" if r.get("ok") else "FAILED"
        errors = ", ".join(f"{name} {value:.1e}" for name, value in r.get("max_abs_error", {}).items())
        tolerance = r.get("tolerance", {})
        limit = f" (tolerance {tolerance.get('atol', '?'):g} + {tolerance.get('rtol', 0):g}*|ref|)" if tolerance else ""
        lines.append(f"  {label} {verdict}: max |error| {errors or '-'}{limit}")
    return lines


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def describe_metrics(metrics: dict) -> list[str]:
    """One short line per figure: reported NLL first, then the export's checks."""
    lines: list[str] = []
    for key, title in NLL_SECTIONS.items():
        if isinstance(metrics.get(key), dict):
            lines += _nll_lines(title, metrics[key])
    if isinstance(metrics.get("parity"), dict):
        lines += _parity_lines(metrics["parity"])
    for key, value in sorted(metrics.items()):
        if key not in NLL_SECTIONS and key != "parity":
            lines += describe_mapping(key, value)
    return lines


def describe_mapping(title: str, value: Any) -> list[str]:
    """A title line, then one indented line per key (nested objects indented further)."""
    if not isinstance(value, dict):
        return [f"{title}: {_plain(value)}"]
    lines = [f"{title}:"]
    for name, item in sorted(value.items()):
        lines += [f"  {line}" for line in describe_mapping(name, item)]
    return lines


def reported_nll(result: dict, split: str, command: str) -> tuple[dict, dict]:
    """A `python -m train.evaluate --json` result -> (protocol, figures) for metrics["nll_reported"]."""
    drawings = ("all 20 drawings of each test character" if result.get("all_drawings") else
                "drawings 0 and 10 of each test character, each conditioned on drawing i + 1")
    protocol = {"k": int(result["k"]), "targets": int(result["targets"]), "split": split, "drawings": drawings,
                "seed": int(result["seed"]), "command": command}
    figures = {key: float(result[key]) for key in ("nll_mean", "nll_sem", "elbo_mean", "elbo_sem")}
    if "nll_sem_characters" in result:  # a character's targets are correlated: its SE is the honest one
        figures["nll_sem"] = float(result["nll_sem_characters"])
        protocol["standard_error"] = "over characters"
    return protocol, figures
