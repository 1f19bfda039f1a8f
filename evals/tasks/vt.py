"""RULER variable tracking `vt` (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654; reference:
NVIDIA/RULER `scripts/data/synthetic/variable_tracking.py`, one chain, four hops).

A chain `VAR ABCDE = 12345`, `VAR FGHIJ = VAR ABCDE`, ... (five variables named with five random
capitals) is spread in order over a noise haystack; the model must list every variable that ends
up holding the value. One worked example (three-letter names, value 12345) comes first, as in
RULER. Scored with `string_match_all` over the five names.

Deviation: the noise is filled one sentence at a time (RULER: one five-sentence line at a time)
so short prompts still meet their token budget closely. The grid's depth does not apply (the
chain is spread over the whole haystack, as in RULER).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from kvmux.evals.tasks.common import Renderer, Sample, sample_rng
from kvmux.evals.tasks.haystack import NOISE_SENTENCES, make_haystack
from kvmux.evals.tasks.placement import Frame, fit_haystack_sample, place_needles

TEMPLATE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {value}, they are: "
)


def chain(rng: random.Random, hops: int, letters: int, value: str) -> tuple[list[str], list[str]]:
    """(variable names, assignment lines) of one chain."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(hops)]
    return names, lines


def worked_example(rng: random.Random, hops: int) -> str:
    """A short solved instance that shows the answer format."""
    names, lines = chain(rng, hops, 3, "12345")
    units = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(25)]
    body, _ = place_needles(units, list(range(len(units) + 1)), lines, None, rng)
    question = QUESTION.format(value="12345")
    prefix = ANSWER_PREFIX.format(num_v=hops + 1, value="12345")
    return TEMPLATE + body + "\n" + question + prefix + " ".join(names)


@dataclass(frozen=True)
class VariableTrackingTask:
    name: str = "vt"
    hops: int = 4
    metric: str = "string_match_all"
    max_new_tokens: int = 30
    uses_depth: bool = False

    def make(
        self, renderer: Renderer, length: int, depth: float | None, index: int, seed: int, max_new_tokens: int = 0
    ) -> Sample:
        rng = sample_rng(seed, self.name, index)
        example = worked_example(rng, self.hops)
        value = str(rng.randint(10000, 99999))
        names, lines = chain(rng, self.hops, 5, value)
        question = QUESTION.format(value=value)
        return fit_haystack_sample(
            task=self.name,
            index=index,
            length=length,
            depth=None,
            renderer=renderer,
            haystack=make_haystack("noise", rng, renderer),
            frame=Frame(
                before=example + "\n\n" + TEMPLATE,
                after="\n" + question,
                answer_prefix=ANSWER_PREFIX.format(num_v=self.hops + 1, value=value),
            ),
            needles=lines,
            answers=names,
            metric=self.metric,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            query=question,
            rng=rng,
        )
