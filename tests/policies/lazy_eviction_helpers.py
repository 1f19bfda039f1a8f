"""Helpers shared by the LazyEviction tests."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def prose(chars: int) -> str:
    """Natural English text shipped with the evals (a public-domain novel)."""
    path = Path(__file__).resolve().parents[2] / "evals" / "corpus" / "pride_and_prejudice.txt"
    return path.read_text(encoding="utf-8")[:chars]


def sharpen(model, factor: float = 6.0):
    """Scale q/k projections so a random model's attention is peaked (varied TS/MRI, few ties)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)


def brute_force_score(ts: int, mri: int, step: int) -> float:
    """The reference code's score, written out for one token and head."""
    h1 = 2.0 / (1.0 + math.exp(min(700.0, 1.0 + (step - ts) / (mri + 1e-5))))
    h2 = 0.0 if mri == 0 else 2.0 / (1.0 + math.exp(min(700.0, mri - 1.0)))
    return h1 + h2
