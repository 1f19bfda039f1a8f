"""Eval report: a Markdown summary and PNG plots from `results.json`.

- `summary.md`: per task, mean score (RULER's 0-100 scale; https://arxiv.org/abs/2404.06654)
  by policy variant and length, averaged over depths and samples, with the KV share kept; for
  right-or-wrong tasks, correct/n with its 95 % interval and a paired test against `full`
  (`paired.py`); the stream perplexity table; every rejected cell with its reason.
- `heatmap_<variant>.png`: score over length x depth, one panel per depth-aware task
  (the needle-in-a-haystack picture).
- `accuracy_vs_kv.png`: mean score against the share of the full KV cache kept, one line per
  policy, one panel per task.
- `ppl_vs_position.png`: perplexity of consecutive windows along the stream, one line per
  variant (StreamingLLM's Fig. 3, https://arxiv.org/abs/2309.17453).
- shared-context cells (scb tasks, turn by turn): their own section in `summary.md` and
  `shared_context.json` (`turns_report.py`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from kvmux.evals.helpers import fmt, pyplot, save_figure
from kvmux.evals.helpers import mean as _mean
from kvmux.evals.quality.paired import paired_table
from kvmux.evals.quality.results import load_results
from kvmux.evals.quality.turns_report import is_turn_cell, turn_tables, write_turn_json


def _fmt(value: float | None, digits: int = 1) -> str:
    return fmt(value, f".{digits}f", missing="—")


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


def _cells(data: dict[str, Any]) -> list[dict[str, Any]]:
    return list(data.get("cells", {}).values())


def _labels(cells: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(c["label"] for c in cells))


def score_table(cells: list[dict[str, Any]], task: str) -> list[str]:
    rows = [c for c in cells if c["task"] == task]
    lengths = sorted({c["length"] for c in rows})
    lines = [
        f"### {task}",
        "",
        "| variant | policy | KV kept | " + " | ".join(str(n) for n in lengths) + " | mean |",
        "|---|---|---|" + "---|" * (len(lengths) + 1),
    ]
    for label in _labels(rows):
        mine = [c for c in rows if c["label"] == label]
        scores, cols = [], []
        for length in lengths:
            done = [c for c in mine if c["length"] == length and c["status"] != "rejected" and c["samples"]]
            rejected = any(c["length"] == length and c["status"] == "rejected" for c in mine)
            values = [s["score"] for c in done for s in c["samples"]]
            value = _mean(values)
            if value is not None:
                scores.extend(values)
            cols.append("rejected" if value is None and rejected else _fmt(value))
        ratios = [c["summary"].get("kv_ratio") for c in mine if c["summary"].get("kv_ratio") is not None]
        kv = f"{100 * _mean(ratios):.0f}%" if ratios else "—"
        lines.append(f"| {label} | {mine[0]['policy']} | {kv} | " + " | ".join(cols) + f" | {_fmt(_mean(scores))} |")
    return lines + [""]


def ppl_table(cells: list[dict[str, Any]]) -> list[str]:
    rows = [c for c in cells if c["metric"] == "perplexity"]
    lines = [
        "### stream_ppl",
        "",
        "| variant | policy | tokens | perplexity | KV kept at end |",
        "|---|---|---|---|---|",
    ]
    for c in sorted(rows, key=lambda c: (c["label"], c["length"])):
        ratio = c["summary"].get("kv_ratio")
        kv = "—" if ratio is None else f"{100 * ratio:.1f}%"
        value = "rejected" if c["status"] == "rejected" else _fmt(c["summary"].get("ppl"), 2)
        lines.append(f"| {c['label']} | {c['policy']} | {c['length']} | {value} | {kv} |")
    return lines + [""]


def markdown(data: dict[str, Any]) -> str:
    meta, cells = data.get("meta", {}), _cells(data)
    lines = [
        "# kvmux eval",
        "",
        f"Model `{meta.get('model')}` via {meta.get('backend')}"
        + (f" ({meta['url']})" if meta.get("url") else "")
        + f", {meta.get('format')} prompts, seed {meta.get('seed')}, "
        + (
            "question passed to the policy (kv_policy.query)"
            if meta.get("query")
            else "question not passed (query-aware policies find it in the prompt themselves)"
        )
        + f", updated {meta.get('updated')}.",
        "",
        "Scores are 0-100 (passkey: exact key; niah/vt/cwe: string_match_all; qa: string_match_part), "
        "averaged over depths and samples. KV kept = bytes kept / bytes of a full cache, at the end of each request.",
        "",
    ]
    tasks = list(dict.fromkeys(c["task"] for c in cells if c["metric"] != "perplexity" and not is_turn_cell(c)))
    for task in tasks:
        lines += score_table(cells, task)
    lines += paired_table(cells)
    lines += turn_tables(data)
    if any(c["metric"] == "perplexity" for c in cells):
        lines += ppl_table(cells)
    rejected = [c for c in cells if c["status"] == "rejected"]
    if rejected:
        lines += ["### Rejected cells", ""]
        for c in rejected:
            depth = "" if c["depth"] is None else f" depth {c['depth']:g}%"
            lines.append(f"- {c['label']} / {c['task']} / {c['length']}{depth}: {c['message']}")
        lines.append("")
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------------
def plot_heatmaps(cells: list[dict[str, Any]], out: Path) -> list[Path]:
    plt = pyplot()
    written = []
    depth_cells = [c for c in cells if c["depth"] is not None and c["metric"] != "perplexity"]
    for label in _labels(depth_cells):
        mine = [c for c in depth_cells if c["label"] == label]
        tasks = list(dict.fromkeys(c["task"] for c in mine))
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            rows = [c for c in mine if c["task"] == task]
            lengths = sorted({c["length"] for c in rows})
            depths = sorted({c["depth"] for c in rows})
            grid = [[float("nan")] * len(lengths) for _ in depths]
            for c in rows:
                value = c["summary"].get("score") if c["status"] != "rejected" else None
                if value is not None:
                    grid[depths.index(c["depth"])][lengths.index(c["length"])] = value
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    ax.text(j, i, "×" if value != value else f"{value:.0f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
            ax.set_xlabel("length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(task)
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.suptitle(f"{label}: score (× = rejected / not run)")
        written.append(save_figure(fig, out / f"heatmap_{_safe(label)}.png"))
    return written


def plot_accuracy_vs_kv(cells: list[dict[str, Any]], out: Path) -> Path | None:
    scored = [c for c in cells if c["metric"] != "perplexity" and c["summary"].get("score") is not None]
    if not scored:
        return None
    plt = pyplot()
    tasks = list(dict.fromkeys(c["task"] for c in scored))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        points: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for label in _labels([c for c in scored if c["task"] == task]):
            mine = [c for c in scored if c["task"] == task and c["label"] == label]
            ratios = [c["summary"]["kv_ratio"] for c in mine if c["summary"].get("kv_ratio") is not None]
            if ratios:
                score = _mean([c["summary"]["score"] for c in mine])
                points[mine[0]["policy"]].append((_mean(ratios), score, label))
        for policy, pts in points.items():
            pts.sort()
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.set_xlabel("KV kept (% of full)")
        ax.set_ylabel("score")
        ax.set_ylim(-5, 105)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out / "accuracy_vs_kv.png")


def plot_ppl(cells: list[dict[str, Any]], out: Path) -> Path | None:
    streams = [c for c in cells if c["metric"] == "perplexity" and c["samples"]]
    if not streams:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in _labels(streams):
        longest = max((c for c in streams if c["label"] == label), key=lambda c: c["length"])
        by_end: dict[int, list[float]] = defaultdict(list)
        for sample in longest["samples"]:
            for w in sample["windows"]:
                by_end[w["end"]].append(w["ppl"])
        ends = sorted(by_end)
        ax.plot(ends, [_mean(by_end[e]) for e in ends], label=f"{label} ({longest['policy']})")
    ax.set_xlabel("position in stream (tokens)")
    ax.set_ylabel("perplexity (window mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "ppl_vs_position.png")


def write_report(results: dict[str, Any] | Path, out: Path) -> list[Path]:
    """Write summary.md and the plots into `out`; returns the files written."""
    data = load_results(results) if isinstance(results, Path) else results
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    summary.write_text(markdown(data))
    cells = _cells(data)
    written = [summary, *plot_heatmaps(cells, out)]
    for path in (plot_accuracy_vs_kv(cells, out), plot_ppl(cells, out), write_turn_json(data, out)):
        if path is not None:
            written.append(path)
    return written
