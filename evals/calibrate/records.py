"""The per-prompt result files of `kvmux calibrate` (`.partial.jsonl`), read back to resume a run."""

from __future__ import annotations

import json
from pathlib import Path


def read_partial(path: Path) -> dict[str, dict]:
    """Per-prompt results of earlier runs (the last line of a key wins; a torn last line is ignored)."""
    found: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                found[record["key"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return found
