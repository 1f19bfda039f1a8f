"""RULER needle-in-a-haystack family (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654;
reference: NVIDIA/RULER `scripts/data/synthetic/niah.py` and `constants.py`).

Needles read "One of the special magic {numbers} for {key} is: {value}."; the question asks for
every value of the queried key(s) and is scored with `string_match_all`. The template and the
answer prefix are RULER's, worded in the singular when exactly one value is expected.

Variants (RULER's table; our haystacks are generated, see `haystack.py`):
| task | haystack | keys | values/key | queried |
|---|---|---|---|---|
| niah_single | noise | 1 | 1 | 1 |
| niah_single_book | book (natural prose) | 1 | 1 | 1 |
| niah_multikey | needle (distractor needles) | 1 | 1 | 1 |
| niah_multikey_book | book (natural prose) | 4 | 1 | 1 |
| niah_multivalue | noise | 1 | 4 | 1 |
| niah_multiquery | noise | 4 | 1 | 4 |

Deviations: RULER's multivalue/multiquery use the essay haystack (downloaded text); ours use
noise by default (the book haystack is available through `NiahTask(haystack="book")`). The
answer-bearing needles sit together at the grid depth instead of at random depths, so the
length x depth heat-map means what it says; needles of keys that are not asked about go to
random places, as in RULER. `niah_multikey_book` is RULER's niah_multikey_1 (essay haystack, 4 keys,
3 of them distractors) with the shipped novel as the essay.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmux.evals.tasks.common import Renderer, Sample, join_list, sample_rng
from kvmux.evals.tasks.haystack import (
    TOKENS_PER_UNIT,
    HaystackKind,
    ValueKind,
    distinct_values,
    make_haystack,
    needle_text,
)
from kvmux.evals.tasks.placement import Frame, fit_haystack_sample

TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n"
)
QUESTION = "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"


def singular(text: str) -> str:
    """RULER's rewording for a single expected answer."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


@dataclass(frozen=True)
class NiahTask:
    name: str
    haystack: HaystackKind = "noise"
    key_kind: ValueKind = "words"
    value_kind: ValueKind = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    metric: str = "string_match_all"
    max_new_tokens: int = 128
    uses_depth: bool = True

    def make(
        self, renderer: Renderer, length: int, depth: float | None, index: int, seed: int, max_new_tokens: int = 0
    ) -> Sample:
        rng = sample_rng(seed, self.name, index)
        keys = distinct_values(rng, self.key_kind, self.num_keys)
        values = [distinct_values(rng, self.value_kind, self.num_values, set(keys)) for _ in keys]
        queried = keys[: self.num_queries]
        single = self.num_queries * self.num_values == 1
        type_v = self.value_kind[:-1] if single else self.value_kind
        query = join_list(queried)
        templates = (TEMPLATE, QUESTION, ANSWER_PREFIX)
        if single:  # reworded before the keys go in, so a key such as "rare-..." is left alone
            templates = tuple(singular(t) for t in templates)
        before, question, prefix = (t.format(type_needle_v=type_v, query=query) for t in templates)
        needles, answers, scattered = [], [], []
        for i, key in enumerate(keys):
            for value in values[i]:
                line = needle_text(type_v, key, value)
                if i < self.num_queries:
                    needles.append(line)
                    answers.append(value)
                else:
                    scattered.append(line)
        rng.shuffle(needles)
        avoid = set(keys) | {v for vs in values for v in vs}
        haystack = make_haystack(self.haystack, rng, renderer, type_v, self.key_kind, self.value_kind, avoid)
        return fit_haystack_sample(
            task=self.name,
            index=index,
            length=length,
            depth=depth,
            renderer=renderer,
            haystack=haystack,
            frame=Frame(before=before, after="\n" + question, answer_prefix=prefix),
            needles=needles,
            answers=answers,
            metric=self.metric,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            query=question,
            rng=rng,
            scattered=scattered,
            sep="\n" if self.haystack == "needle" else " ",
            guess_tokens_per_unit=TOKENS_PER_UNIT[self.haystack],
        )


NIAH_TASKS = (
    NiahTask("niah_single", haystack="noise"),
    NiahTask("niah_single_book", haystack="book"),
    NiahTask("niah_multikey", haystack="needle"),
    NiahTask("niah_multikey_book", haystack="book", num_keys=4),
    NiahTask("niah_multivalue", haystack="noise", num_values=4),
    NiahTask("niah_multiquery", haystack="noise", num_keys=4, num_queries=4),
)
