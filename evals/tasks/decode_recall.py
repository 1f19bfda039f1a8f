"""Recall during decoding: a fact stated in the prompt must survive text fed after it as if decoded.

Policies that evict while decoding (LazyEviction, arXiv 2506.15969, keeps the tokens that recur;
StreamingLLM keeps the most recent ones) are tested on what arrives after the prompt. The prompt,
prefilled, states one fact: "the secret number of <name> is <5 digits>". Then the "book" haystack
(consecutive sentences of the shipped novel from a seeded one) is fed through decode-phase
forwards, the fact restated as "(Remember: the secret number of <name> is <digits>.)" at the first
sentence end after every `restate_every` prose tokens, as long as that is within the first `depth`
percent of the prose; the rest never mentions it (make it longer than the policy's budget to test
recall after eviction). Last come the question and "Answer: The secret number of <name> is"; the
greedy answer must contain the digits (string_match_all).

`Sample.decode_from` is the first token of the fed part; `kvmux eval` runs the task in-process (see
`kvmux.evals.quality.stream`), `--ppl-chunk` tokens per forward. Length: prompt + fed tokens +
answer, the prose fitted to it as the other tasks fit their haystack. With the chat format the fact
is the user turn and the fed text follows the assistant header.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmux.evals.tasks.common import Renderer, Sample, fit_units, sample_rng
from kvmux.evals.tasks.haystack import make_haystack

NAMES = ("Harriet", "Barnaby", "Rosalind", "Tobias", "Clementine", "Ignatius", "Philippa", "Augustin")
FACT = "Before the story begins, note this fact: the secret number of {name} is {value}."
REMINDER = "(Remember: the secret number of {name} is {value}.)"
QUESTION = "what is the secret number of {name}?"
ANSWER_PREFIX = "Answer: The secret number of {name} is"


@dataclass(frozen=True)
class DecodeRecallTask:
    name: str = "decode_recall"
    metric: str = "string_match_all"
    max_new_tokens: int = 8
    uses_depth: bool = True
    restate_every: int = 150  # prose tokens between two restatements of the fact

    def make(
        self, renderer: Renderer, length: int, depth: float | None, index: int, seed: int, max_new_tokens: int = 0
    ) -> Sample:
        rng = sample_rng(seed, self.name, index)
        name, value = rng.choice(NAMES), str(rng.randint(10000, 99999))
        max_new_tokens = max_new_tokens or self.max_new_tokens
        fact, reminder = FACT.format(name=name, value=value), REMINDER.format(name=name, value=value)
        head = renderer.render(fact + "\n\n", "")
        answer_prefix = ANSWER_PREFIX.format(name=name)
        tail = f"\n\nQuestion: {QUESTION.format(name=name)}\n{answer_prefix}"
        haystack = make_haystack("book", rng, renderer)
        share = 100.0 if depth is None else depth

        def build(n: int, words: int = 0) -> str:
            units, cumulative = (
                haystack.with_partial(n, words) if words else (haystack.units(n), haystack.cumulative(n))
            )
            return head + self._fed_text(units, cumulative, share, reminder) + tail

        budget = length - max_new_tokens
        n, _ = fit_units(build, renderer.count, budget, guess=max(1, budget // 30))
        next_words = len(haystack.units(n + 1)[n].split())
        _, prompt = fit_units(lambda k: build(n, k), renderer.count, budget, 4, upper=next_words - 1)
        encoded = renderer.tokenizer(prompt, add_special_tokens=not renderer.chat, return_offsets_mapping=True)
        decode_from = next(i for i, (start, _) in enumerate(encoded.offset_mapping) if start >= len(head))
        return Sample(
            task=self.name,
            index=index,
            length=length,
            depth=depth,
            prompt=prompt,
            prompt_ids=list(encoded.input_ids),
            context=prompt.removesuffix(answer_prefix),
            answer_prefix=answer_prefix,
            answers=[value],
            metric=self.metric,
            max_new_tokens=max_new_tokens,
            query=QUESTION.format(name=name),
            haystack_span=(len(head), len(prompt) - len(tail)),
            needle_spans=[(head.index(fact), head.index(fact) + len(fact))],
            decode_from=decode_from,
        )

    def _fed_text(self, units: list[str], cumulative: list[int], share: float, reminder: str) -> str:
        """The prose units, the reminder after every `restate_every` tokens within the first `share`%."""
        limit, mark = cumulative[-1] * share / 100, self.restate_every
        parts: list[str] = []
        for unit, done in zip(units, cumulative[1:], strict=True):
            parts.append(unit)
            if mark <= done <= limit:
                parts.append(reminder)
                mark = (done // self.restate_every + 1) * self.restate_every
        return " ".join(parts)
