"""Long-context task generators, by name (RULER-style tasks, passkey, document QA, recall during
decoding, stream perplexity, shared-context questions asked turn by turn).

Every generation task has `name`, `metric`, `max_new_tokens`, `uses_depth` and
`make(renderer, length, depth, index, seed, max_new_tokens=0) -> Sample`; `stream_ppl` instead
yields a token stream for the perplexity measurement; the shared-context tasks (`shared_context`
true) make one context with several turns, `make(..., turns=N) -> SharedContextSample`.
"""

from __future__ import annotations

from kvmux.evals.tasks.cwe import CommonWordsTask
from kvmux.evals.tasks.decode_recall import DecodeRecallTask
from kvmux.evals.tasks.niah import NIAH_TASKS, NiahTask
from kvmux.evals.tasks.passkey import PASSKEY_TASKS, PasskeyTask
from kvmux.evals.tasks.qa import DocumentQATask
from kvmux.evals.tasks.shared_context import SHARED_CONTEXT_TASKS, SharedContextTask
from kvmux.evals.tasks.stream_ppl import StreamPPLTask
from kvmux.evals.tasks.vt import VariableTrackingTask

Task = (
    PasskeyTask
    | NiahTask
    | VariableTrackingTask
    | CommonWordsTask
    | DocumentQATask
    | DecodeRecallTask
    | StreamPPLTask
    | SharedContextTask
)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        *PASSKEY_TASKS,
        *NIAH_TASKS,
        VariableTrackingTask(),
        CommonWordsTask(),
        DocumentQATask(),
        DecodeRecallTask(),
        StreamPPLTask(),
        *SHARED_CONTEXT_TASKS,
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task '{name}'; available: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "get_task"]
