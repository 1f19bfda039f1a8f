"""What every task generator shares: the sample record, prompt rendering, seeding, and length fitting.

Length fitting follows RULER (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654,
`scripts/data/synthetic/*.py`): a sample of target length L holds a prompt of at most
`L - max_new_tokens` tokens, counted with the real tokenizer on the fully rendered prompt
(chat template and answer prefix included). The number of haystack units is searched so the
prompt is as long as possible without exceeding that budget.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

CHAT_SENTINEL = "\x00KVMUX_CONTEXT\x00"


class TaskLengthError(ValueError):
    """The requested length is too short to hold even an empty instance of the task."""


@dataclass
class Sample:
    """One generated test item: the prompt sent to the model and how to score the answer."""

    task: str
    index: int
    length: int  # target tokens: prompt + max_new_tokens
    depth: float | None  # percent of the haystack before the answer-bearing needle(s)
    prompt: str  # fully rendered prompt (chat template and answer prefix included)
    prompt_ids: list[int]
    context: str  # the user-visible task text, without the answer prefix
    answer_prefix: str
    answers: list[str]
    metric: str  # string_match_all | string_match_part | passkey
    max_new_tokens: int
    query: str  # the question alone, for query-aware policies
    haystack_span: tuple[int, int] = (0, 0)  # char span of the haystack inside `prompt`
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # answer-bearing needles in `prompt`
    # prompt_ids[:decode_from] are prefilled, the rest fed through decode-phase forwards (None: all prefilled)
    decode_from: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def budget(self) -> int:
        return self.length - self.max_new_tokens

    @property
    def prompt_sha256(self) -> str:
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("prompt_ids")
        return data

    def needle_token_indices(self, tokenizer, needle: int = 0) -> list[int]:
        """Indices in `prompt_ids` of the tokens overlapping answer-bearing needle `needle`."""
        return self.span_token_indices(tokenizer, *self.needle_spans[needle])

    def span_token_indices(self, tokenizer, start: int, end: int) -> list[int]:
        """Indices in `prompt_ids` of the tokens overlapping the characters [start, end) of `prompt`."""
        enc = tokenizer(self.prompt, add_special_tokens=False, return_offsets_mapping=True)
        if enc.input_ids != list(self.prompt_ids):
            raise ValueError("the prompt does not re-tokenise to the sample's ids")
        return [i for i, (s, e) in enumerate(enc.offset_mapping) if s < end and e > start]


class Renderer:
    """Turns (context, answer prefix) into the exact prompt text and token ids the model reads.

    Raw: `context + answer_prefix` (RULER's `base` template). Chat: the tokenizer's chat template
    with `context` as the user turn and the assistant turn opened by the answer prefix (RULER
    appends the answer prefix after the model template the same way).
    """

    def __init__(self, tokenizer: Any, chat: bool = False):
        self.tokenizer = tokenizer
        self.chat = chat
        self.head, self.tail = "", ""
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("--chat was asked for but the tokenizer has no chat template; use --raw")
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": CHAT_SENTINEL}], add_generation_prompt=True, tokenize=False
            )
            self.head, _, self.tail = rendered.partition(CHAT_SENTINEL)

    @property
    def name(self) -> str:
        return "chat" if self.chat else "raw"

    def render(self, context: str, answer_prefix: str) -> str:
        if self.chat:
            return self.head + context + self.tail + answer_prefix.lstrip()
        return context + answer_prefix

    def context_offset(self) -> int:
        """Where the context starts inside a rendered prompt."""
        return len(self.head)

    def encode(self, text: str) -> list[int]:
        # a rendered chat template already carries its own special tokens
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def count(self, text: str) -> int:
        return len(self.encode(text))


def sample_rng(seed: int, task: str, index: int) -> random.Random:
    """The random source of one sample: the same for every length and depth, so cells compare."""
    digest = hashlib.sha256(f"{seed}|{task}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def fit_units(
    build: Callable[[int], T], size: Callable[[T], int], budget: int, guess: int = 64, upper: int | None = None
) -> tuple[int, T]:
    """Largest n in [0, upper] with size(build(n)) <= budget (size must grow with n); returns (n, build(n))."""
    empty = build(0)
    if size(empty) > budget:
        raise TaskLengthError(f"the task needs {size(empty)} tokens without any filler; the budget is {budget}")
    lo, lo_item = 0, empty  # lo always fits
    hi = max(1, guess if upper is None else min(guess, upper))
    while True:
        item = build(hi)
        if size(item) > budget:
            break
        lo, lo_item = hi, item
        if upper is not None and hi >= upper:
            return lo, lo_item
        hi = hi * 2 if upper is None else min(hi * 2, upper)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        item = build(mid)
        if size(item) <= budget:
            lo, lo_item = mid, item
        else:
            hi = mid
    return lo, lo_item


def depth_index(cumulative: list[int], depth: float) -> int:
    """Unit index where `depth` percent of the haystack's tokens lie before it.

    `cumulative[i]` is the token count of the first i units (cumulative[0] == 0).
    """
    if not 0.0 <= depth <= 100.0:
        raise ValueError(f"depth must be within 0..100 percent, got {depth}")
    target = cumulative[-1] * depth / 100.0
    best = min(range(len(cumulative)), key=lambda i: (abs(cumulative[i] - target), i))
    return best


def join_pieces(pieces: list[tuple[str, bool]], sep: str = " ") -> tuple[str, list[tuple[int, int]]]:
    """Join haystack units and needles; needles sit on their own lines.

    pieces: (text, is_needle). Returns the text and the char spans of the needles.
    """
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    prev_needle = None
    for text, is_needle in pieces:
        if prev_needle is not None:
            glue = "\n" if (is_needle or prev_needle) else sep
            out.append(glue)
            pos += len(glue)
        if is_needle:
            spans.append((pos, pos + len(text)))
        out.append(text)
        pos += len(text)
        prev_needle = is_needle
    return "".join(out), spans


def join_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b, and c' (RULER's query wording)."""
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + f", and {items[-1]}"
