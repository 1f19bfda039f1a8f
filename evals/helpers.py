"""Helpers shared by `kvmux eval` and `kvmux bench`: number formatting for the reports, means, the
command line echoed into a report, `--policy-overrides` parsing (a sweep per preset for eval, one
setting for every preset for bench), loading a tokenizer from a local folder, and matplotlib set up
for writing PNG files.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

OVERRIDES_FLAG = "--policy-overrides"


def fmt(value: float | None, spec: str = ".1f", scale: float = 1.0, missing: str = "–") -> str:
    """`value * scale` formatted with `spec`, or `missing` when there is no value."""
    return missing if value is None else format(value * scale, spec)


def mean(values: list[float]) -> float | None:
    """The arithmetic mean, or None for no values."""
    return statistics.fmean(values) if values else None


def command_line(subcommand: str, argv: list[str] | None = None) -> str:
    """`kvmux <subcommand> <flags>` as this process was started (for the report)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == [subcommand]:
        words = words[1:]
    return shlex.join(["kvmux", subcommand, *words])


def _json_object(text: str, shape: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{OVERRIDES_FLAG} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{OVERRIDES_FLAG} must be a JSON object: {shape}")
    return value


def sweep_overrides(text: str | None) -> dict[str, Any]:
    """`kvmux eval`'s overrides: {"preset": {param: value}} or {"preset": [{...}, {...}]} (one
    variant per setting, a budget sweep); checked against the presets by the runner."""
    if not text:
        return {}
    return _json_object(text, '{"preset": {"param": value}} or {"preset": [{...}, {...}]}')


def shared_overrides(text: str | None, preset_names: list[str]) -> dict[str, dict[str, Any]]:
    """`kvmux bench`'s overrides, one setting per preset: `{"window": 512}` applies to every preset
    (the caller drops keys a preset's policy lacks); `{"streaming_llm": {"window": 512}}` targets
    presets by name."""
    if not text:
        return {name: {} for name in preset_names}
    data = _json_object(text, '{"param": value} or {"preset": {"param": value}}')
    if data and all(isinstance(v, dict) for v in data.values()):
        unknown = sorted(set(data) - set(preset_names))
        if unknown:
            raise SystemExit(f"{OVERRIDES_FLAG} names presets not selected: {unknown}")
        return {name: dict(data.get(name, {})) for name in preset_names}
    return {name: dict(data) for name in preset_names}


def pyplot():
    """matplotlib.pyplot on the file-only Agg back-end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a figure; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def load_tokenizer(folder: str | Path):
    """A tokenizer from a local folder (never downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def embedded_tokenizer_dir(materialize: bool = False) -> Path | None:
    """The embedded model's tokenizer folder: converted from its GGUF file first if `materialize`,
    else only if an earlier run already did (None otherwise)."""
    from kvmux.models.embedded import EMBEDDED_NAME, cache_dir, embedded_gguf_path, materialize_gguf

    if materialize:
        return Path(materialize_gguf(embedded_gguf_path()))
    found = sorted(cache_dir().glob(f"{EMBEDDED_NAME}*/tokenizer.json"))
    return found[-1].parent if found else None
