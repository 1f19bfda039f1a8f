"""The calibration prompts: needles in natural prose at several lengths and depths, generated offline.

Each prompt is a RULER niah_single sample over the book haystack (`niah_single_book`: consecutive
sentences of the shipped *Pride and Prejudice*, one needle "One of the special magic number for
{key} is: {value}." at the given depth), ending with the answer prefix, so the model's next tokens
copy the needle's value (7 digits, one token each in Llama-style tokenizers). `value_positions` are
the prompt positions of the value's tokens: the needle tokens a retrieval head is expected to copy.
The gate prompts (`kvmux calibrate --gate-tasks`) may also come from other single-needle tasks: RULER's
niah_single over the noise haystack (repeated filler sentences), or the passkey over filler or prose
(DuoAttention calibrates its gates on passkeys), since the heads a sparse policy needs differ between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmux.evals.tasks.common import Renderer, Sample
from kvmux.evals.tasks.niah import NIAH_TASKS
from kvmux.evals.tasks.passkey import PASSKEY_TASKS

COPY_TASK = "niah_single_book"  # the copy-score prompts; their keys carry no task name
GATE_TASKS = (COPY_TASK, "niah_single", "passkey", "passkey_book")  # single-needle tasks
TASKS = {t.name: t for t in (*NIAH_TASKS, *PASSKEY_TASKS) if t.name in GATE_TASKS}
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
    positions = tuple(sample.span_token_indices(tokenizer, offset, offset + len(value)))
    if not positions:
        raise ValueError("the needle's value has no tokens")
    return positions


def needle_prompts(
    tokenizer, lengths: list[int], depths: list[float], samples: int, seed: int, chat: bool, task: str = COPY_TASK
) -> list[NeedlePrompt]:
    """Every (length, depth, sample) prompt of `task` (one of `TASKS`), shortest first."""
    if task not in TASKS:
        raise ValueError(f"unknown calibration task {task!r}; expected one of {', '.join(TASKS)}")
    maker, renderer = TASKS[task], Renderer(tokenizer, chat=chat)
    prefix = "" if task == COPY_TASK else f"{task}/"  # copy-task keys stay as earlier profiles wrote them
    out = []
    for length in sorted(lengths):
        for depth in depths:
            for index in range(samples):
                sample = maker.make(renderer, length, depth, index, seed, max_new_tokens=MAX_NEW_TOKENS)
                key = f"{prefix}{length}/{depth:g}/{index}"
                out.append(NeedlePrompt(key, sample, value_positions(sample, tokenizer)))
    return out
