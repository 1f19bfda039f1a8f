"""Right/wrong accuracy with its interval, and each variant against a baseline on the same prompts.

For every task whose scores are all 0 or 100 (passkey, single-needle niah: a prompt is right or wrong)
and every length, each variant's correct/n with the Wilson 95 % score interval, and, where the file
holds a baseline variant (the first one running policy `full`), a paired comparison on the prompts
both answered: how many only the baseline got right, how many only the variant got right, and the
exact two-sided McNemar p (a binomial test of those discordant prompts at one half; McNemar, 1947).
Every variant of a `kvmux eval` run answers the same prompts, so the pairing removes the prompt to
prompt spread that the two separate intervals carry: a one-prompt difference on 20 prompts has p = 1.
Prompts are matched by the SHA-256 of their text (by depth and index where a file lacks it).
Tasks with partial credit (multi-value niah, QA) stay in the score tables only.
"""

from __future__ import annotations

import math
from typing import Any

from kvmux.evals.quality.turns_report import wilson_interval

RIGHT, WRONG = 100.0, 0.0


def mcnemar_exact(only_baseline: int, only_variant: int) -> float:
    """Two-sided exact McNemar p: P(a split at least this uneven) for Binomial(discordant, 1/2)."""
    discordant = only_baseline + only_variant
    if discordant == 0:
        return 1.0
    low = min(only_baseline, only_variant)
    tail = sum(math.comb(discordant, i) for i in range(low + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def _prompt_key(cell: dict[str, Any], sample: dict[str, Any]) -> tuple:
    sha = sample.get("prompt_sha256")
    return (sha,) if sha else (cell["depth"], sample.get("index"))


def _answers(cells: list[dict[str, Any]]) -> dict[str, dict[tuple, bool]]:
    """{variant: {prompt: right}} over the cells given (one task and length)."""
    found: dict[str, dict[tuple, bool]] = {}
    for cell in cells:
        if cell["status"] == "rejected":
            continue
        mine = found.setdefault(cell["label"], {})
        for sample in cell["samples"]:
            if sample.get("score") is not None:
                mine[_prompt_key(cell, sample)] = sample["score"] == RIGHT
    return {label: answers for label, answers in found.items() if answers}


def right_or_wrong(cells: list[dict[str, Any]]) -> bool:
    scores = [s.get("score") for c in cells for s in c["samples"] if s.get("score") is not None]
    return bool(scores) and all(score in (RIGHT, WRONG) for score in scores)


def baseline_label(cells: list[dict[str, Any]]) -> str | None:
    return next((c["label"] for c in cells if c["policy"] == "full" and c["status"] != "rejected"), None)


def paired_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant of one task and length: correct, n, interval and the paired comparison."""
    answers = _answers(cells)
    base = baseline_label(cells)
    rows = []
    for label, mine in sorted(answers.items(), key=lambda item: item[0] != base):
        correct = sum(mine.values())
        low, high = wilson_interval(correct, len(mine)) or (0.0, 0.0)
        row: dict[str, Any] = {"variant": label, "correct": correct, "n": len(mine), "ci95": (100 * low, 100 * high)}
        if base is not None and label != base and base in answers:
            shared = mine.keys() & answers[base].keys()
            only_base = sum(1 for k in shared if answers[base][k] and not mine[k])
            only_mine = sum(1 for k in shared if mine[k] and not answers[base][k])
            row.update(baseline=base, shared=len(shared), only_baseline=only_base, only_variant=only_mine)
            row["p"] = mcnemar_exact(only_base, only_mine)
        rows.append(row)
    return rows


def paired_table(cells: list[dict[str, Any]]) -> list[str]:
    """The report's Markdown section (empty when no task is scored right or wrong)."""
    scored = [c for c in cells if c["metric"] != "perplexity" and c["samples"]]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for cell in scored:
        groups.setdefault((cell["task"], cell["length"]), []).append(cell)
    lines: list[str] = []
    for (task, length), group in groups.items():
        if not right_or_wrong(group):
            continue
        for row in paired_rows(group):
            low, high = row["ci95"]
            accuracy = f"{100 * row['correct'] / row['n']:.0f} [{low:.0f}–{high:.0f}]"
            if "p" in row:
                versus = f"{row['only_baseline']} / {row['only_variant']} of {row['shared']}"
                p_value = f"{row['p']:.2g}"
            else:
                versus, p_value = "—", "—"
            lines.append(
                f"| {task} | {length} | {row['variant']} | {row['correct']}/{row['n']} | {accuracy} | {versus} "
                f"| {p_value} |"
            )
    if not lines:
        return []
    return [
        "### Right or wrong: 95 % intervals, and each variant against the baseline on the same prompts",
        "",
        "Wilson score intervals. The baseline is the first variant running policy `full`. The pair column: prompts "
        "only the baseline got right / only the variant got right, of the prompts both answered; p is the exact "
        "two-sided McNemar test of those.",
        "",
        "| task | length | variant | correct | accuracy % [95 % CI] | only baseline / only variant | McNemar p |",
        "|---|---|---|---:|---:|---:|---:|",
        *lines,
        "",
    ]
