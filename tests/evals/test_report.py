"""The report writes its Markdown table and PNG plots from a results file."""

from __future__ import annotations

import json

from kvmux.evals.quality.report import markdown, write_report
from kvmux.evals.quality.results import cell_key, summarize


def _cell(label, policy, task, metric, length, depth, samples, status="done", message=None):
    cell = dict(label=label, preset=label.split("[")[0], overrides={}, policy=policy, task=task, metric=metric)
    cell.update(length=length, depth=depth, status=status, message=message, samples=samples)
    cell["summary"] = summarize(cell)
    return cell


def _results():
    cells = {}
    for label, policy, ratio, good in (("full", "full", 1.0, True), ("sl[window=64]", "streaming_llm", 0.3, False)):
        for length in (1024, 2048):
            for depth in (0.0, 50.0, 100.0):
                hit = good or depth == 100.0
                sample = {"index": 0, "prompt_tokens": length - 10, "score": 100.0 if hit else 0.0}
                sample["kv"] = {"kv_ratio": ratio, "tokens_kept": int(ratio * length)}
                cells[cell_key(label, "passkey", length, depth)] = _cell(
                    label, policy, "passkey", "passkey", length, depth, [sample]
                )
        windows = [{"end": e, "tokens": 256, "ppl": 10.0 + e / 1000} for e in (256, 512, 768)]
        stream = {"index": 0, "ppl": 11.0, "windows": windows, "kv": {"kv_ratio": ratio}}
        cells[cell_key(label, "stream_ppl", 768, None)] = _cell(
            label, policy, "stream_ppl", "perplexity", 768, None, [stream]
        )
    cells[cell_key("full", "passkey", 16384, 0.0)] = _cell(
        "full", "full", "passkey", "passkey", 16384, 0.0, [], "rejected", "needs 16384 tokens but accepts at most 8192"
    )
    return {"version": 1, "meta": {"model": "m", "backend": "engine", "format": "raw", "seed": 1}, "cells": cells}


def test_markdown_tables_show_scores_kv_and_rejections():
    text = markdown(_results())
    assert "| full | full | 100% | 100.0 | 100.0 | rejected | 100.0 |" in text
    assert "| sl[window=64] | streaming_llm | 30% | 33.3 | 33.3 | — | 33.3 |" in text
    assert "| full | full | 768 | 11.00 | 100.0% |" in text
    assert "- full / passkey / 16384 depth 0%: needs 16384 tokens but accepts at most 8192" in text


def test_report_writes_summary_and_png_plots(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    written = write_report(tmp_path, tmp_path / "report")
    names = sorted(p.name for p in written)
    assert names == [
        "accuracy_vs_kv.png",
        "heatmap_full.png",
        "heatmap_sl_window=64.png",
        "ppl_vs_position.png",
        "summary.md",
    ]
    for path in written:
        assert path.stat().st_size > 500
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
