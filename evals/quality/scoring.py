"""Scorers, as RULER computes them (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654;
NVIDIA/RULER `scripts/eval/synthetic/constants.py` and `evaluate.py`), plus passkey's exact
integer match (Mohtashami & Jaggi, 2023, https://arxiv.org/abs/2305.16300, `run_test.py`).

Scores are per sample in 0..100; a cell's score is their mean.
- `string_match_all`: share of references found (case-insensitive substring) in the prediction;
- `string_match_part`: 100 if any reference is found, else 0;
- `passkey`: 100 if the first integer in the prediction equals the key, else 0.
Predictions are post-processed as RULER does: strip, control characters to newlines, strip.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")
_INTEGER = re.compile(r"\d+")


def postprocess(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    text = postprocess(prediction).lower()
    return 100.0 * sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    text = postprocess(prediction).lower()
    return 100.0 * max(ref.lower() in text for ref in references)


def passkey_match(prediction: str, references: Sequence[str]) -> float:
    """The first integer of the output against the key (landmark attention's check)."""
    found = _INTEGER.search(postprocess(prediction))
    return 100.0 if found is not None and int(found.group(0)) == int(references[0]) else 0.0


SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "passkey": passkey_match,
}


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    if metric not in SCORERS:
        raise KeyError(f"unknown metric '{metric}'; available: {sorted(SCORERS)}")
    return SCORERS[metric](prediction, references)


def perplexity(nlls: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood (natural log) of the given tokens."""
    if not nlls:
        raise ValueError("perplexity of no tokens")
    return math.exp(sum(nlls) / len(nlls))
