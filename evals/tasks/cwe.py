"""RULER common words extraction `cwe` (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654;
reference: NVIDIA/RULER `scripts/data/synthetic/common_words_extraction.py`).

A numbered list "1. w 2. w ..." where ten words appear often (30 times each; 6 below 4K tokens)
and the rest rarely (3 times; once below 4K); the model must name the ten common words. One
solved example (40 words, repeated 10/3 times; 20 words, 3/1 below 4K) comes first. Words are
the wonderwords noun, adjective and verb lists (shipped in the `wonderwords` package).
Scored with `string_match_all` over the ten words.

Deviation: when a very long prompt needs more distinct words than the lists hold, RULER draws
from a downloaded English word list; we add adjective-noun compounds instead. Depth does not
apply.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from kvmux.evals.tasks.common import Renderer, Sample, fit_units, sample_rng
from kvmux.evals.tasks.haystack import wonder_words

TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
QUESTION = "Question: What are the 10 most common words in the above list?"
ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
NUM_COMMON = 10


@lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    words = sorted(set(wonder_words("noun")) | set(wonder_words("adjective")) | set(wonder_words("verb")))
    random.Random(42).shuffle(words)
    return tuple(words)


def pick_words(rng: random.Random, count: int) -> list[str]:
    pool = word_pool()
    if count <= len(pool):
        return rng.sample(pool, count)
    words = list(pool)
    seen = set(words)
    adjectives, nouns = wonder_words("adjective"), wonder_words("noun")
    while len(words) < count:
        word = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        if word not in seen:
            seen.add(word)
            words.append(word)
    rng.shuffle(words)
    return words


def word_list(words: list[str], common_repeats: int, rare_repeats: int, rng: random.Random) -> str:
    common, rare = words[:NUM_COMMON], words[NUM_COMMON:]
    items = common * common_repeats + rare * rare_repeats
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))


@dataclass(frozen=True)
class CommonWordsTask:
    name: str = "cwe"
    metric: str = "string_match_all"
    max_new_tokens: int = 120
    uses_depth: bool = False

    def make(
        self, renderer: Renderer, length: int, depth: float | None, index: int, seed: int, max_new_tokens: int = 0
    ) -> Sample:
        rng = sample_rng(seed, self.name, index)
        short = length < 4096
        ex_words, ex_common, ex_rare = (20, 3, 1) if short else (40, 10, 3)
        common_repeats, rare_repeats = (6, 1) if short else (30, 3)
        example_words = pick_words(rng, ex_words)
        example = (
            TEMPLATE
            + word_list(example_words, ex_common, ex_rare, rng)
            + "\n"
            + QUESTION
            + ANSWER_PREFIX
            + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_words[:NUM_COMMON]))
        )
        words_seed, order_seed = rng.getrandbits(64), rng.getrandbits(64)
        max_new = max_new_tokens or self.max_new_tokens

        def build(n: int) -> tuple[str, str, list[int], list[str]]:
            words = pick_words(random.Random(words_seed), NUM_COMMON + n)
            context = (
                example
                + "\n"
                + TEMPLATE
                + word_list(words, common_repeats, rare_repeats, random.Random(order_seed))
                + "\n"
                + QUESTION
            )
            prompt = renderer.render(context, ANSWER_PREFIX)
            return context, prompt, renderer.encode(prompt), words[:NUM_COMMON]

        budget = length - max_new
        _, (context, prompt, ids, answers) = fit_units(
            build, lambda item: len(item[2]), budget, guess=max(1, budget // (4 * rare_repeats + 1))
        )
        start = renderer.context_offset() + len(example) + 1 + len(TEMPLATE)
        return Sample(
            task=self.name,
            index=index,
            length=length,
            depth=None,
            prompt=prompt,
            prompt_ids=ids,
            context=context,
            answer_prefix=ANSWER_PREFIX,
            answers=answers,
            metric=self.metric,
            max_new_tokens=max_new,
            query=QUESTION,
            haystack_span=(start, start + len(context) - len(example) - 1 - len(TEMPLATE) - 1 - len(QUESTION)),
        )
