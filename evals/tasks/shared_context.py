"""Shared-context tasks in the spirit of SCBench (Li et al., 2024, https://arxiv.org/abs/2412.10319): one
long context, several questions asked one after another, so a server's prefix cache can reuse the
context between them.

- `scb_kv` (SCBench's multi-request mode, its Retr.KV retrieval): the context is consecutive sentences
  of the shipped novel (`evals/corpus/`) with one key -> value needle per key at spread depths (10, 30,
  50, 70 and 90 % of the prose for five keys). Turn k's prompt is that context, then question k, which
  asks the value of another key. Every turn's prompt starts with the same context, so turns 2..
  extend the prefix turn 1 left in the cache.
- `scb_multiturn` (SCBench's multi-turn mode): the chat version. Turn k's messages are [user: context +
  question 1, assistant: answer 1, user: question 2, ..., user: question k], where the assistant turns
  are the model's own earlier answers, rendered with the model's chat template.

Each turn is scored with `string_match_all` on its key's value. Deviations from SCBench: the context is
real prose with needles instead of a JSON object of uuids (keys are adjective-noun pairs, values 7-digit
numbers, as RULER's needles, https://arxiv.org/abs/2404.06654), and contexts are generated from the seed
at any length. Both tasks draw the same keys, values, question order and prose start for a given seed
and index.

Length: the context is the longest (in whole sentences, then words) that lets every turn fit in
`length` tokens. scb_kv: each turn's prompt + max_new_tokens. scb_multiturn: the last turn's rendered
messages, with every earlier answer counted as max_new_tokens tokens, + max_new_tokens (the answers are
only known while the task runs, so a later turn can differ from this estimate by a few tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmux.evals.tasks.common import Renderer, depth_index, fit_units, join_pieces, sample_rng
from kvmux.evals.tasks.haystack import Haystack, ValueKind, distinct_values, make_haystack

INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n"
)
NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"
DEFAULT_TURNS = 5
CACHE_MODES = ("on", "off")  # the turns run with the prefix cache serving the context, and without it
MIN_KEYS = 5  # needles in every context; more when more turns are asked for (one key per turn)
TOKENS_PER_SENTENCE = 30  # first guess of the length search
RNG_NAME = "scb"  # both tasks draw the same keys, values and prose for a seed and index


@dataclass(frozen=True)
class Turn:
    """One question about the context: the key it asks for, where that key's needle sits, the value."""

    key: str
    question: str
    answers: tuple[str, ...]
    depth: float  # percent of the prose before the key's needle


@dataclass(frozen=True)
class TurnPrompt:
    """What one turn sends: the token ids of a rendered prompt (scb_kv) or chat messages (scb_multiturn)."""

    query: str  # the question alone, for query-aware policies
    answers: tuple[str, ...]
    max_new_tokens: int
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class SharedContextSample:
    """One context and its questions; `turn_prompt(k, earlier answers)` is what turn k sends."""

    task: str
    index: int
    length: int  # target tokens of every turn: prompt + max_new_tokens
    context: str  # instruction + prose with the needles: the part every turn shares
    context_tokens: int
    turns: list[Turn]
    metric: str
    max_new_tokens: int
    needle_spans: list[tuple[int, int]]  # char spans of the needles in `context`, in depth order
    chat_turns: bool  # scb_multiturn: the earlier answers are part of each later turn
    prompt_ids: list[list[int]] = field(default_factory=list)  # scb_kv: each turn's prompt

    @property
    def context_sha256(self) -> str:
        return hashlib.sha256(self.context.encode("utf-8")).hexdigest()

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt a turn sends (scb_multiturn: the budget its last turn was fitted to)."""
        if self.prompt_ids:
            return max(len(ids) for ids in self.prompt_ids)
        return self.length - self.max_new_tokens

    def messages(self, turn: int, answers: list[str]) -> list[dict[str, str]]:
        """scb_multiturn's messages of turn `turn` (0-based)."""
        return turn_messages(self.context, self.turns, turn, answers)

    def turn_prompt(self, turn: int, answers: list[str]) -> TurnPrompt:
        spec = self.turns[turn]
        if self.chat_turns:
            return TurnPrompt(spec.question, spec.answers, self.max_new_tokens, messages=self.messages(turn, answers))
        return TurnPrompt(spec.question, spec.answers, self.max_new_tokens, prompt_ids=list(self.prompt_ids[turn]))


def turn_messages(context: str, turns: list[Turn], turn: int, answers: list[str]) -> list[dict[str, str]]:
    """The messages of turn `turn` (0-based): the context with the first question, then each earlier answer
    as the assistant's turn followed by the next question."""
    if len(answers) < turn:
        raise ValueError(f"turn {turn + 1} needs the {turn} earlier answers, got {len(answers)}")
    messages = [{"role": "user", "content": context + "\n" + turns[0].question}]
    for k in range(1, turn + 1):
        messages.append({"role": "assistant", "content": answers[k - 1]})
        messages.append({"role": "user", "content": turns[k].question})
    return messages


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Messages rendered by the chat template and tokenized as the server does (no added special tokens)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def kv_prompt(renderer: Renderer, context: str, turn: Turn) -> str:
    """scb_kv's prompt of one turn: the context, the question, the answer prefix (RULER's wording)."""
    return renderer.render(context + "\n" + turn.question, ANSWER_PREFIX.format(key=turn.key))


def spread_depths(count: int) -> list[float]:
    """Evenly spread needle depths: the middle of each of `count` equal slices of the prose."""
    return [100.0 * (i + 0.5) / count for i in range(count)]


def place_spread(
    units: list[str], cumulative: list[int], needles: list[str], depths: list[float]
) -> tuple[str, list[tuple[int, int]]]:
    """Prose with needle i at depth i (each on its own line); returns the text and the needles' spans."""
    slots: dict[int, list[str]] = {}
    for needle, depth in zip(needles, depths, strict=True):
        slots.setdefault(depth_index(cumulative, depth), []).append(needle)
    pieces: list[tuple[str, bool]] = []
    for i in range(len(units) + 1):
        pieces.extend((needle, True) for needle in slots.get(i, []))
        if i < len(units):
            pieces.append((units[i], False))
    return join_pieces(pieces)


@dataclass
class _Fitted:
    context: str
    spans: list[tuple[int, int]]
    prompt_ids: list[list[int]]
    size: int  # tokens the length budget is checked against


@dataclass(frozen=True)
class SharedContextTask:
    name: str
    chat_turns: bool = False  # scb_multiturn
    metric: str = "string_match_all"
    max_new_tokens: int = 32
    uses_depth: bool = False  # the needles are spread over the whole context
    shared_context: bool = True  # run turn by turn (`kvmux.evals.quality.turns`)
    value_kind: ValueKind = "numbers"

    def make(
        self,
        renderer: Renderer,
        length: int,
        depth: float | None,
        index: int,
        seed: int,
        max_new_tokens: int = 0,
        turns: int = DEFAULT_TURNS,
    ) -> SharedContextSample:
        if turns < 1:
            raise ValueError(f"a shared-context sample needs at least one turn, got {turns}")
        tokenizer = renderer.tokenizer
        if self.chat_turns and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{self.name} renders chat messages, but the tokenizer has no chat template")
        rng = sample_rng(seed, RNG_NAME, index)
        num_keys = max(MIN_KEYS, turns)
        keys = distinct_values(rng, "words", num_keys)
        values = distinct_values(rng, self.value_kind, num_keys, set(keys))
        depths = spread_depths(num_keys)
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        order = rng.sample(range(num_keys), turns)  # each turn asks another key, in a seeded order
        asked = [Turn(keys[i], QUESTION.format(key=keys[i]), (values[i],), depths[i]) for i in order]
        haystack = make_haystack("book", rng, renderer)
        max_new = max_new_tokens or self.max_new_tokens

        def build(n: int, words: int) -> _Fitted:
            units, cumulative = haystack.units(n), haystack.cumulative(n)
            if words:  # the first words of the next sentence top the context up to the budget
                units, cumulative = haystack.with_partial(n, words)
            body, spans = place_spread(units, cumulative, needles, depths)
            context = INSTRUCTION + body
            spans = [(a + len(INSTRUCTION), b + len(INSTRUCTION)) for a, b in spans]
            if self.chat_turns:  # the last turn, each earlier answer counted as max_new tokens
                last = turn_messages(context, asked, turns - 1, [""] * (turns - 1))
                return _Fitted(context, spans, [], len(chat_prompt_ids(tokenizer, last)) + (turns - 1) * max_new)
            ids = [renderer.encode(kv_prompt(renderer, context, t)) for t in asked]
            return _Fitted(context, spans, ids, max(len(i) for i in ids))

        fitted = _fit(build, length - max_new, haystack)
        return SharedContextSample(
            task=self.name,
            index=index,
            length=length,
            context=fitted.context,
            context_tokens=len(tokenizer(fitted.context, add_special_tokens=False)["input_ids"]),
            turns=asked,
            metric=self.metric,
            max_new_tokens=max_new,
            needle_spans=fitted.spans,
            chat_turns=self.chat_turns,
            prompt_ids=fitted.prompt_ids,
        )


def _fit(build: Callable[[int, int], _Fitted], budget: int, haystack: Haystack) -> _Fitted:
    """The longest context within `budget`: whole sentences first, then words of the next one."""
    size = lambda item: item.size  # noqa: E731
    n, _ = fit_units(lambda k: build(k, 0), size, budget, guess=max(1, budget // TOKENS_PER_SENTENCE))
    next_words = len(haystack.units(n + 1)[n].split())
    _, fitted = fit_units(lambda k: build(n, k), size, budget, 4, upper=max(next_words - 1, 1))
    return fitted


SHARED_CONTEXT_TASKS = (SharedContextTask("scb_kv"), SharedContextTask("scb_multiturn", chat_turns=True))

__all__ = ["SHARED_CONTEXT_TASKS", "SharedContextSample", "SharedContextTask", "Turn", "TurnPrompt"]
