"""What an eval run scores: policy variants (a preset plus overrides) and the grid's settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmux.evals.quality.backends import DEFAULT_PRESET
from kvmux.evals.tasks.shared_context import CACHE_MODES, DEFAULT_TURNS


@dataclass(frozen=True)
class Variant:
    """One policy setting to score: a preset plus parameter overrides."""

    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.preset
        return self.preset + "[" + ",".join(f"{k}={v}" for k, v in sorted(self.overrides.items())) + "]"

    def kv_policy(self, query: str | None) -> dict[str, Any] | None:
        if self.preset == DEFAULT_PRESET:
            return None
        policy: dict[str, Any] = {"preset": self.preset, **self.overrides}
        if query is not None:
            policy["query"] = query
        return policy


def make_variants(presets: list[str], overrides: dict[str, Any] | None) -> list[Variant]:
    """Presets, each expanded by its overrides: {"preset": {...}} or {"preset": [{...}, {...}]}."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(presets))
    if unknown:
        raise ValueError(f"--policy-overrides names presets {unknown} that are not in --presets {presets}")
    variants: list[Variant] = []
    for name in presets:
        settings = overrides.get(name, [{}])
        for setting in settings if isinstance(settings, list) else [settings]:
            if not isinstance(setting, dict):
                raise ValueError(f"--policy-overrides for '{name}' must be an object or a list of objects")
            variants.append(Variant(name, dict(setting)))
    return variants


@dataclass
class EvalConfig:
    variants: list[Variant]
    tasks: list[str]
    lengths: list[int]
    depths: list[float]
    samples: int = 1
    seed: int = 42
    chat: bool = False
    max_new_tokens: int | None = None  # None: each task's default
    send_query: bool = True  # pass the question as kv_policy.query (query-aware policies)
    ppl_chunk: int = 1
    ppl_window: int = 256
    out: Path = Path("eval-results")
    cache_modes: list[str] = field(default_factory=lambda: list(CACHE_MODES))  # shared-context tasks
    turns: int = DEFAULT_TURNS  # shared-context tasks: questions per context
