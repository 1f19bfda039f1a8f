"""Put needles into a haystack at a depth and fit the whole prompt to a token budget.

Depth follows the needle-in-a-haystack convention (gkamradt/LLMTest_NeedleInAHaystack;
RULER's `depth_percent`): `depth`% of the haystack's tokens come before the answer-bearing
needles. When several needles carry the answer they are placed together at that depth; with no
depth they go to random unit boundaries, as RULER does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvmux.evals.tasks.common import Renderer, Sample, depth_index, fit_units, join_pieces
from kvmux.evals.tasks.haystack import Haystack


@dataclass(frozen=True)
class Frame:
    """The text around the haystack: context = before + haystack + after; then the answer prefix."""

    before: str
    after: str
    answer_prefix: str


def place_needles(
    units: list[str],
    cumulative: list[int],
    needles: list[str],
    depth: float | None,
    rng: random.Random,
    sep: str = " ",
    scattered: list[str] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Haystack text with `needles` at `depth` (together) and `scattered` at random boundaries.

    Returns the text and the char spans of `needles` (not of the scattered ones).
    """
    slots: dict[int, list[tuple[str, bool]]] = {}
    if depth is None:  # random boundaries, needles kept in their given order
        for at, needle in zip(sorted(rng.randint(0, len(units)) for _ in needles), needles, strict=True):
            slots.setdefault(at, []).append((needle, True))
    else:
        at = depth_index(cumulative, depth)
        slots[at] = [(needle, True) for needle in needles]
    for needle in scattered or []:
        slots.setdefault(rng.randint(0, len(units)), []).append((needle, False))
    pieces: list[tuple[str, bool]] = []
    answer_flags: list[bool] = []  # one per needle piece, in order
    for i in range(len(units) + 1):
        for text, answer in slots.get(i, []):
            pieces.append((text, True))
            answer_flags.append(answer)
        if i < len(units):
            pieces.append((units[i], False))
    text, spans = join_pieces(pieces, sep)
    return text, [span for span, answer in zip(spans, answer_flags, strict=True) if answer]


def fit_haystack_sample(
    *,
    task: str,
    index: int,
    length: int,
    depth: float | None,
    renderer: Renderer,
    haystack: Haystack,
    frame: Frame,
    needles: list[str],
    answers: list[str],
    metric: str,
    max_new_tokens: int,
    query: str,
    rng: random.Random,
    scattered: list[str] | None = None,
    sep: str = " ",
    guess_tokens_per_unit: int = 6,
) -> Sample:
    """The longest prompt within `length - max_new_tokens` tokens with the needles placed."""
    positions_seed = rng.getrandbits(64)

    def build(n: int, words: int = 0) -> tuple[str, list[int], tuple[int, int], list[tuple[int, int]]]:
        units, cumulative = haystack.units(n), haystack.cumulative(n)
        if words:  # the first words of the next unit top the haystack up to the budget
            units, cumulative = haystack.with_partial(n, words)
        body, spans = place_needles(units, cumulative, needles, depth, random.Random(positions_seed), sep, scattered)
        context = frame.before + body + frame.after
        prompt = renderer.render(context, frame.answer_prefix)
        start = renderer.context_offset() + len(frame.before)
        shifted = [(a + start, b + start) for a, b in spans]
        return prompt, renderer.encode(prompt), (start, start + len(body)), shifted

    budget = length - max_new_tokens
    size = lambda item: len(item[1])  # noqa: E731
    n, _ = fit_units(build, size, budget, guess=max(1, budget // guess_tokens_per_unit))
    next_words = len(haystack.units(n + 1)[n].split())
    _, (prompt, ids, hay_span, spans) = fit_units(lambda k: build(n, k), size, budget, 4, upper=next_words - 1)
    context_start = renderer.context_offset()
    context = prompt[context_start : hay_span[1] + len(frame.after)]
    return Sample(
        task=task,
        index=index,
        length=length,
        depth=depth,
        prompt=prompt,
        prompt_ids=ids,
        context=context,
        answer_prefix=frame.answer_prefix,
        answers=answers,
        metric=metric,
        max_new_tokens=max_new_tokens,
        query=query,
        haystack_span=hay_span,
        needle_spans=spans,
    )
