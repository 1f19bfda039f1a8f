"""The calibration prompts: needles in natural prose at several lengths and depths, generated offline.

Each prompt is a RULER niah_single sample over the book haystack (`niah_single_book`: consecutive
sentences of the shipped *Pride and Prejudice*, one needle "One of the special magic number for
{key} is: {value}." at the given depth), ending with the answer prefix, so the model's next tokens
copy the needle's value (7 digits, one token each in Llama-style tokenizers). `value_positions` are
the prompt positions of the value's tokens: the needle tokens a retrieval head is expected to copy.
The gate prompts (`kvmux calibrate --gate-haystacks`) may also use RULER's noise haystack (`niah_single`:
the repeated filler sentences), since the heads a sparse policy needs differ between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmux.evals.tasks.common import Renderer, Sample
from kvmux.evals.tasks.niah import NiahTask

TASKS = {"book": NiahTask("niah_single_book", haystack="book"), "noise": NiahTask("niah_single", haystack="noise")}
HAYSTACKS = tuple(TASKS)
MAX_NEW_TOKENS = 16  # room the samples leave for the answer


@dataclass(frozen=True)
class NeedlePrompt:
    key: str  # "length/depth/index", what the resume file is keyed by
    sample: Sample
    value_positions: tuple[int, ...]

    @property
    def ids(self) -> list[int]:
        return list(self.sample.prompt_ids)

    @property
    def value(self) -> str:
        return self.sample.answers[0]


def value_positions(sample: Sample, tokenizer) -> tuple[int, ...]:
    """Prompt positions of the tokens that overlap the needle's value."""
    start, end = sample.needle_spans[0]
    value = sample.answers[0]
    offset = sample.prompt.rfind(value, start, end)
    if offset < 0:
        raise ValueError(f"needle value {value!r} not found in its needle")
    enc = tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc.input_ids) != list(sample.prompt_ids):
        raise ValueError("the prompt does not re-tokenise to the sample's ids")
    stop = offset + len(value)
    positions = tuple(i for i, (s, e) in enumerate(enc.offset_mapping) if s < stop and e > offset)
    if not positions:
        raise ValueError("the needle's value has no tokens")
    return positions


def needle_prompts(
    tokenizer, lengths: list[int], depths: list[float], samples: int, seed: int, chat: bool, haystack: str = "book"
) -> list[NeedlePrompt]:
    """Every (length, depth, sample) prompt over `haystack` (book or noise), shortest first."""
    if haystack not in TASKS:
        raise ValueError(f"unknown calibration haystack {haystack!r}; expected one of {', '.join(HAYSTACKS)}")
    task, renderer = TASKS[haystack], Renderer(tokenizer, chat=chat)
    prefix = "" if haystack == "book" else f"{haystack}/"  # book keys stay as earlier profiles wrote them
    out = []
    for length in sorted(lengths):
        for depth in depths:
            for index in range(samples):
                sample = task.make(renderer, length, depth, index, seed, max_new_tokens=MAX_NEW_TOKENS)
                key = f"{prefix}{length}/{depth:g}/{index}"
                out.append(NeedlePrompt(key, sample, value_positions(sample, tokenizer)))
    return out
