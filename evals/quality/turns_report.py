"""Summaries and the report section of the shared-context cells (`scb_kv`, `scb_multiturn`).

Per cell (variant, task, length, cache mode): accuracy over every turn of every context (n = contexts x
turns) with its Wilson 95 % score interval (it stays within 0-100 % and keeps its coverage at small n),
accuracy by turn index, the median time to first token of turn 1 and of turns 2.. with their ratio
(turns 2.. / turn 1: below 1 when the prefix cache serves the shared context), and the mean prompt
tokens served by the cache at each turn. Where a variant ran with the cache on and off, the number of
turns whose answers are token-identical in both modes (the answer text is compared where the backend
reports no token ids): a policy whose reuse is exact must answer identically.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from kvmux.evals.helpers import fmt

Z95 = 1.959964  # the standard normal's 97.5th percentile
TTFT_MEANING = {
    "engine": "the in-process engine's prefill time (kv.prefill_ms)",
    "http": "from sending the request to the first streamed token",
}


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion, as fractions (None for n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _by_turn(records: list[dict[str, Any]], field: str) -> list[list[float]]:
    grouped: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.get(field) is not None:
            grouped[r["turn"]].append(float(r[field]))
    return [grouped[t] for t in range(1, max(grouped, default=0) + 1)]


def summarize_turns(cell: dict[str, Any]) -> dict[str, Any]:
    """Accuracy (with its 95 % interval), per-turn accuracy, TTFT medians and cache use of one cell."""
    contexts = cell["samples"]
    records = [r for c in contexts for r in c["turns"]]
    correct = sum(1 for r in records if r["correct"])
    interval = wilson_interval(correct, len(records))
    first = [float(r["ttft_ms"]) for r in records if r["turn"] == 1 and r.get("ttft_ms") is not None]
    later = [float(r["ttft_ms"]) for r in records if r["turn"] > 1 and r.get("ttft_ms") is not None]
    ttft_first, ttft_later = _median(first), _median(later)
    return {
        "n": len(records),
        "contexts": len(contexts),
        "correct": correct,
        "accuracy": round(100 * correct / len(records), 2) if records else None,
        "ci95": None if interval is None else [round(100 * interval[0], 2), round(100 * interval[1], 2)],
        "accuracy_by_turn": [round(100 * statistics.fmean(v), 2) for v in _by_turn(records, "correct")],
        "ttft_ms_turn1": ttft_first,
        "ttft_ms_later": ttft_later,
        "ttft_ratio": round(ttft_later / ttft_first, 3) if ttft_first and ttft_later is not None else None,
        "cached_tokens_by_turn": [round(statistics.fmean(v), 1) for v in _by_turn(records, "cached_tokens")],
        "prompt_tokens_by_turn": [round(statistics.fmean(v), 1) for v in _by_turn(records, "prompt_tokens")],
    }


def is_turn_cell(cell: dict[str, Any]) -> bool:
    return cell.get("kind") == "turns"


def _answer(record: dict[str, Any], other: dict[str, Any]) -> Any:
    both_ids = record.get("completion_ids") is not None and other.get("completion_ids") is not None
    return record["completion_ids"] if both_ids else record["prediction"]


def identical_turns(on: dict[str, Any], off: dict[str, Any]) -> tuple[int, int]:
    """(turns answered identically, turns compared) between two cells of the same contexts."""
    off_turns = {(c["index"], r["turn"]): r for c in off["samples"] for r in c["turns"]}
    same = compared = 0
    for context in on["samples"]:
        for record in context["turns"]:
            other = off_turns.get((context["index"], record["turn"]))
            if other is not None:
                compared += 1
                same += _answer(record, other) == _answer(other, record)
    return same, compared


def turn_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per shared-context cell: its summary, plus the on/off identity count where both ran."""
    turn_cells = [c for c in cells if is_turn_cell(c)]
    by_mode = {(c["label"], c["task"], c["length"], c["turns"], c["cache"]): c for c in turn_cells}
    rows = []
    for c in turn_cells:
        row = {k: c[k] for k in ("task", "label", "policy", "length", "cache", "turns", "status", "message")}
        row.update(c["summary"] or summarize_turns(c))
        on = by_mode.get((c["label"], c["task"], c["length"], c["turns"], "on"))
        off = by_mode.get((c["label"], c["task"], c["length"], c["turns"], "off"))
        if on is not None and off is not None:
            row["identical_turns"], row["compared_turns"] = identical_turns(on, off)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["task"], r["length"], r["label"], r["cache"] != "on"))


def _joined(values: list[float] | None, spec: str) -> str:
    return " / ".join(format(v, spec) for v in values) if values else "—"


def turn_tables(data: dict[str, Any]) -> list[str]:
    """The Markdown section of the shared-context cells (empty when there are none)."""
    rows = turn_rows(list(data.get("cells", {}).values()))
    if not rows:
        return []
    backend = data.get("meta", {}).get("backend")
    lines = [
        "### Shared context (scb tasks)",
        "",
        "Each context is asked its questions one after another; n = contexts x turns. Accuracy: turns whose "
        "answer holds the key's value, with the Wilson 95% interval. TTFT: "
        + TTFT_MEANING.get(backend, "time to first token")
        + "; medians of turn 1 and of turns 2.., ratio = turns 2.. / turn 1. Cached: mean prompt tokens served "
        "by the prefix cache per turn. Same on/off: turns answered token-identically with the cache on and "
        "off (exact reuse must give all).",
        "",
        "| task | variant | policy | length | cache | n | accuracy [95% CI] | by turn | TTFT turn 1 ms "
        "| TTFT turns 2.. ms | ratio | cached tokens by turn | same on/off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['task']} | {r['label']} | {r['policy']} | {r['length']} | {r['cache']} "
        if r["status"] == "rejected" and not r.get("n"):
            lines.append(head + "| rejected |" + " |" * 7)
            continue
        ci = r.get("ci95")
        accuracy = fmt(r.get("accuracy"), ".1f", missing="—") + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
        same = f"{r['identical_turns']}/{r['compared_turns']}" if "compared_turns" in r else "—"
        cols = [
            f"{r['n']} ({r['contexts']}x{r['turns']})",
            accuracy,
            _joined(r.get("accuracy_by_turn"), ".0f"),
            fmt(r.get("ttft_ms_turn1"), ".1f", missing="—"),
            fmt(r.get("ttft_ms_later"), ".1f", missing="—"),
            fmt(r.get("ttft_ratio"), ".2f", missing="—"),
            _joined(r.get("cached_tokens_by_turn"), ".0f"),
            same,
        ]
        lines.append(head + "| " + " | ".join(cols) + " |")
    return lines + [""]


def write_turn_json(data: dict[str, Any], out: Path) -> Path | None:
    """`shared_context.json`: the rows of the section above, with what TTFT means for this backend."""
    rows = turn_rows(list(data.get("cells", {}).values()))
    if not rows:
        return None
    backend = data.get("meta", {}).get("backend")
    body = {"model": data.get("meta", {}).get("model"), "backend": backend, "ttft": TTFT_MEANING.get(backend)}
    path = out / "shared_context.json"
    path.write_text(json.dumps({**body, "cells": rows}, indent=1))
    return path
