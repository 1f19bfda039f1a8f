"""Passkey retrieval (Mohtashami & Jaggi, Landmark Attention, 2023, https://arxiv.org/abs/2305.16300;
reference: epfml/landmark-attention `llama/run_test.py`; reused verbatim by LongLoRA).

The prompt is the reference's: a task description, repeated "garbage" sentences, the line
"The pass key is K. Remember it. K is the pass key." and the final question "What is the pass
key? The pass key is". The key is a random integer in 1..50000; the first integer in the
output must equal it.

Deviations: the reference measures the garbage in characters and splits it at a random point;
we fill to a token budget (RULER style) one sentence at a time and put the key line at the
requested token depth, so a length x depth grid is exact. `passkey_book` puts the same key line
in natural prose (the shipped novel, `haystack.py`) instead of the repeated garbage sentences,
which sparse attention finds much harder to skip.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmux.evals.tasks.common import Renderer, Sample, sample_rng
from kvmux.evals.tasks.haystack import TOKENS_PER_UNIT, HaystackKind, make_haystack
from kvmux.evals.tasks.placement import Frame, fit_haystack_sample

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
QUESTION = "What is the pass key?"
ANSWER_PREFIX = " The pass key is"


@dataclass(frozen=True)
class PasskeyTask:
    name: str = "passkey"
    haystack: HaystackKind = "noise"
    metric: str = "passkey"
    max_new_tokens: int = 10
    uses_depth: bool = True

    def make(
        self, renderer: Renderer, length: int, depth: float | None, index: int, seed: int, max_new_tokens: int = 0
    ) -> Sample:
        rng = sample_rng(seed, self.name, index)
        key = str(rng.randint(1, 50000))
        line = f"The pass key is {key}. Remember it. {key} is the pass key."
        return fit_haystack_sample(
            task=self.name,
            index=index,
            length=length,
            depth=depth,
            renderer=renderer,
            haystack=make_haystack(self.haystack, rng, renderer),
            frame=Frame(before=TASK_DESCRIPTION + "\n", after="\n" + QUESTION, answer_prefix=ANSWER_PREFIX),
            needles=[line],
            answers=[key],
            metric=self.metric,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            query=QUESTION,
            rng=rng,
            guess_tokens_per_unit=TOKENS_PER_UNIT[self.haystack],
        )


PASSKEY_TASKS = (PasskeyTask(), PasskeyTask("passkey_book", haystack="book"))
