"""Haystacks and needles for the retrieval tasks (RULER, https://arxiv.org/abs/2404.06654, niah.py).

A haystack is an endless, prefix-stable sequence of units (one unit = one sentence), so a
sample grows by taking more units and its content does not change with the target length:
- `noise`: RULER's / landmark attention's repeated sentences ("The grass is green. ...");
- `needle`: distractor needles, each with its own random key and value (RULER's `needle`);
- `book`: consecutive sentences of the shipped public-domain novel from a random start,
  our offline stand-in for RULER's Paul Graham essay haystack.

Keys and values are RULER's kinds: `words` (adjective-noun from the wonderwords lists),
`numbers` (7 digits) and `uuids`.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Literal

from kvmux.evals.tasks.common import Renderer
from kvmux.evals.tasks.corpus import corpus_sentences

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

HaystackKind = Literal["noise", "needle", "book"]
# typical tokens per unit of each haystack: the first guess of the fit to a token budget (its result
# does not depend on it)
TOKENS_PER_UNIT: dict[str, int] = {"noise": 5, "needle": 20, "book": 30}
ValueKind = Literal["words", "numbers", "uuids"]


@lru_cache(maxsize=4)
def wonder_words(kind: str) -> tuple[str, ...]:
    """A wonderwords word list ('noun', 'adjective', 'verb'), profanity removed, file order kept."""
    assets = resources.files("wonderwords.assets")
    banned = set(assets.joinpath("profanitylist.txt").read_text(encoding="utf-8").split("\n"))
    words = assets.joinpath(f"{kind}list.txt").read_text(encoding="utf-8").split("\n")
    return tuple(w.strip() for w in words if w.strip() and w.strip() not in banned and " " not in w.strip())


def random_value(rng: random.Random, kind: ValueKind) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return f"{rng.choice(wonder_words('adjective'))}-{rng.choice(wonder_words('noun'))}"
    raise ValueError(f"unknown value kind {kind!r}")


def distinct_values(rng: random.Random, kind: ValueKind, count: int, avoid: set[str] | None = None) -> list[str]:
    seen = set(avoid or ())
    out: list[str] = []
    while len(out) < count:
        value = random_value(rng, kind)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def needle_text(type_needle_v: str, key: str, value: str) -> str:
    return f"One of the special magic {type_needle_v} for {key} is: {value}."


class Haystack:
    """Units of one haystack with cached token counts (for placing needles at a token depth)."""

    def __init__(self, next_unit: Callable[[int], str], renderer: Renderer):
        self.next_unit = next_unit
        self.renderer = renderer
        self._units: list[str] = []
        self._cumulative: list[int] = [0]

    def _extend(self, n: int) -> None:
        if n <= len(self._units):
            return
        new = [self.next_unit(i) for i in range(len(self._units), n)]
        # counted with a leading space, as units are joined by spaces
        counts = self.renderer.tokenizer([" " + u for u in new], add_special_tokens=False)["input_ids"]
        for unit, ids in zip(new, counts, strict=True):
            self._units.append(unit)
            self._cumulative.append(self._cumulative[-1] + len(ids))

    def units(self, n: int) -> list[str]:
        self._extend(n)
        return self._units[:n]

    def with_partial(self, n: int, words: int) -> tuple[list[str], list[int]]:
        """The first n units plus the first `words` words of unit n, with their cumulative counts."""
        partial = " ".join(self.units(n + 1)[n].split()[:words])
        extra = len(self.renderer.tokenizer(" " + partial, add_special_tokens=False)["input_ids"])
        cumulative = self.cumulative(n)
        return self.units(n) + [partial], cumulative + [cumulative[-1] + extra]

    def cumulative(self, n: int) -> list[int]:
        """Token counts of the first i units, for i = 0..n."""
        self._extend(n)
        return self._cumulative[: n + 1]


def make_haystack(
    kind: HaystackKind,
    rng: random.Random,
    renderer: Renderer,
    type_needle_v: str = "numbers",
    key_kind: ValueKind = "words",
    value_kind: ValueKind = "numbers",
    avoid: set[str] | None = None,
) -> Haystack:
    """A haystack of the given kind; `avoid` keeps distractor keys and values off the real ones."""
    if kind == "noise":
        return Haystack(lambda i: NOISE_SENTENCES[i % len(NOISE_SENTENCES)], renderer)
    if kind == "book":
        sentences = corpus_sentences()
        start = rng.randrange(len(sentences))
        return Haystack(lambda i: sentences[(start + i) % len(sentences)], renderer)
    if kind == "needle":
        # a private stream, so the distractors do not depend on how many were asked for before
        stream = random.Random(rng.getrandbits(64))
        used = set(avoid or ())

        def distractor(_: int) -> str:
            key = distinct_values(stream, key_kind, 1, used)[0]
            value = distinct_values(stream, value_kind, 1, used)[0]
            used.update((key, value))
            return needle_text(type_needle_v, key, value)

        return Haystack(distractor, renderer)
    raise ValueError(f"unknown haystack {kind!r}; expected noise, needle or book")
