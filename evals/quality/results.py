"""The eval results file: every cell and sample, written atomically so a run can resume.

Layout of `results.json`:

    {"version": 1,
     "meta": {"model", "backend", "url", "format", "seed", "query", "created", "updated"},
     "cells": {key: {"label", "preset", "overrides", "policy", "task", "metric", "length", "depth",
                     "status", "message", "samples": [...], "summary": {...}}}}

A cell is done when all its samples are in (or it was rejected); `partial` cells keep the
samples they have and are completed on the next run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from kvmux.evals.helpers import mean

VERSION = 1
FINISHED = ("done", "rejected")


def cell_key(label: str, task: str, length: int, depth: float | None) -> str:
    return f"{label}|{task}|{length}|{'-' if depth is None else f'{depth:g}'}"


class ResultStore:
    """Results of one output folder; `save()` after every change keeps the file resumable."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {"version": VERSION, "meta": dict(meta), "cells": {}}
        if path.is_file():
            self.data = json.loads(path.read_text())
            self._check_meta(meta)
        else:
            self.data["meta"]["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")

    def _check_meta(self, meta: dict[str, Any]) -> None:
        old = self.data.get("meta", {})
        for field in ("model", "format", "seed", "query"):
            if field in old and field in meta and old[field] != meta[field]:
                raise ValueError(
                    f"{self.path} holds results for {field}={old[field]!r}, this run asks for {meta[field]!r}; "
                    "use another --out folder (or delete the file) so results of different settings do not mix"
                )
        self.data["meta"].update({k: v for k, v in meta.items() if k not in ("created",)})

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    def cell(self, key: str, **fields: Any) -> dict[str, Any]:
        """The cell under `key`, created with `fields` if new."""
        if key not in self.cells:
            self.cells[key] = {**fields, "status": "partial", "message": None, "samples": [], "summary": {}}
        return self.cells[key]

    def is_finished(self, key: str) -> bool:
        return key in self.cells and self.cells[key]["status"] in FINISHED

    def save(self) -> None:
        self.data["meta"]["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _mean(values: list[float]) -> float | None:
    value = mean(values)
    return None if value is None else round(value, 4)


def summarize(cell: dict[str, Any]) -> dict[str, Any]:
    """Mean score and KV figures of a cell's samples."""
    samples = cell["samples"]
    kvs = [s.get("kv") or {} for s in samples]

    def kv_mean(name: str) -> float | None:
        return _mean([float(kv[name]) for kv in kvs if isinstance(kv.get(name), (int, float))])

    summary: dict[str, Any] = {
        "n": len(samples),
        "kv_ratio": kv_mean("kv_ratio"),
        "tokens_kept": kv_mean("tokens_kept"),
        "kv_bytes_kept": kv_mean("kv_bytes_kept"),
        "prompt_tokens": _mean([float(s["prompt_tokens"]) for s in samples if "prompt_tokens" in s]),
        "seconds": _mean([float(s["seconds"]) for s in samples if "seconds" in s]),
    }
    if cell.get("metric") == "perplexity":
        summary["ppl"] = _mean([float(s["ppl"]) for s in samples])
    else:
        summary["score"] = _mean([float(s["score"]) for s in samples])
    return summary


def load_results(path: Path) -> dict[str, Any]:
    folder_or_file = Path(path)
    if folder_or_file.is_dir():
        folder_or_file = folder_or_file / "results.json"
    return json.loads(folder_or_file.read_text())
