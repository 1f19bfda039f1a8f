"""The report's right-or-wrong table: Wilson intervals and the exact McNemar test against `full`."""

from __future__ import annotations

import math

import pytest

from kvmux.evals.quality.paired import mcnemar_exact, paired_rows, paired_table
from kvmux.evals.quality.results import summarize


def _cell(label, policy, rights, task="passkey", length=4096, depth=50.0, shas=None):
    samples = [
        {"index": i, "prompt_sha256": (shas or [f"p{j}" for j in range(len(rights))])[i], "score": 100.0 if r else 0.0}
        for i, r in enumerate(rights)
    ]
    cell = dict(label=label, preset=label, overrides={}, policy=policy, task=task, metric="passkey")
    cell.update(length=length, depth=depth, status="done", message=None, samples=samples)
    cell["summary"] = summarize(cell)
    return cell


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 0) == 1.0  # one discordant prompt says nothing
    assert mcnemar_exact(3, 1) == pytest.approx(2 * (1 + 4) / 16)
    assert mcnemar_exact(0, 7) == pytest.approx(2 / 2**7)
    assert mcnemar_exact(14, 0) == pytest.approx(2 / 2**14)
    assert mcnemar_exact(5, 5) == 1.0


def test_rows_pair_prompts_by_their_text_not_their_order():
    full = _cell("full", "full", [True] * 8 + [False, False])
    # the variant's samples come in another order: its first two prompts are full's last two
    shas = ["p8", "p9"] + [f"p{j}" for j in range(8)]
    variant = _cell("hip_rh", "hip", [True, False] + [True] * 5 + [False] * 3, shas=shas)
    rows = {row["variant"]: row for row in paired_rows([variant, full])}
    assert list(rows) == ["full", "hip_rh"]  # the baseline first
    assert (rows["full"]["correct"], rows["full"]["n"]) == (8, 10)
    assert "p" not in rows["full"]
    row = rows["hip_rh"]
    assert (row["correct"], row["shared"], row["only_baseline"], row["only_variant"]) == (6, 10, 3, 1)
    assert row["p"] == pytest.approx(0.625)
    low, high = row["ci95"]
    assert 0 < low < 60 < high < 100
    # Wilson at 6/10: centre (0.6 + z²/20) / (1 + z²/10)
    z = 1.959964
    centre = (0.6 + z * z / 20) / (1 + z * z / 10)
    assert (low + high) / 200 == pytest.approx(centre)
    assert math.isclose(row["ci95"][0], 31.27, abs_tol=0.05)


def test_table_skips_partial_credit_tasks_and_files_without_full():
    partial = _cell("full", "full", [True, False])
    partial["samples"][1]["score"] = 50.0
    assert paired_table([partial]) == []
    lone = _cell("hip", "hip", [True, True, False])
    lines = paired_table([lone])
    assert "| passkey | 4096 | hip | 2/3 | 67 [21–94] | — | — |" in lines


def test_table_lists_each_task_and_length_with_the_pairing():
    cells = [
        _cell("full", "full", [True] * 20, length=8192),
        _cell("hip", "hip", [True] * 6 + [False] * 14, length=8192),
        _cell("full", "full", [True] * 4, length=4096),
    ]
    text = "\n".join(paired_table(cells))
    assert "| passkey | 8192 | full | 20/20 | 100 [84–100] | — | — |" in text
    assert "| passkey | 8192 | hip | 6/20 | 30 [15–52] | 14 / 0 of 20 | 0.00012 |" in text
    assert "| passkey | 4096 | full | 4/4 | 100 [51–100] | — | — |" in text
