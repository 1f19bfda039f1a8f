"""LazyEviction's `window: auto` when another policy prefills: its prompt observation, run from outside.

LazyEviction (arXiv 2506.15969; `kvmux.policies.lazy_eviction`) calibrates its eviction window W from the
recurrence intervals of the prompt's last `calibration_rows` query rows, observed inside its own prefill.
In a composed preset the prefill part runs those forwards, so the composed session hands each prefill
attention call to `PromptCalibration.observe` as well: the LazyEviction session's own recorder sees the
same rows it would have seen (its queries, over every prompt key before them), and `finish` sets W from
them before the first decode step, with `window_source: prefill` as when LazyEviction prefills alone.

This needs every prompt token's keys in the calls, i.e. a prefill part that keeps the whole prompt (a
`plain` cache, see `handover.py`). After a StreamingLLM prefill, which evicts between its forwards, W is
taken from the decode steps instead (LazyEviction's rule for a stream with no prompt to observe).
"""

from __future__ import annotations

from kvmux.policies.attention_call import AttentionCall
from kvmux.policies.base import PolicyParams, PolicySession
from kvmux.policies.composed.handover import CACHE_KIND, PLAIN
from kvmux.policies.lazy_eviction.policy import LazyEvictionSession
from kvmux.policies.lazy_eviction.recurrence import RecurrenceState


def observes_prompt(prefill_policy: str, decode_policy: str, decode_params: PolicyParams) -> bool:
    """Whether the decode part calibrates on the prompt that the prefill part reads."""
    return (
        decode_policy == "lazy_eviction"
        and getattr(decode_params, "window", None) == "auto"
        and CACHE_KIND.get(prefill_policy) == PLAIN
    )


class PromptCalibration:
    """Feeds the last `calibration_rows` prompt rows of a prefill to a LazyEviction session's recorder."""

    def __init__(self, session: LazyEvictionSession, prompt_start: int, prompt_tokens: int):
        self.session = session
        rows = min(session.params.calibration_rows, prompt_tokens)
        self.first = prompt_start + prompt_tokens - rows  # position of the first observed row
        info = session.info
        self.states = [RecurrenceState(info.num_heads, info.device) for _ in range(info.num_layers)]

    @classmethod
    def for_parts(cls, prefill: PolicySession, decode: PolicySession, prompt_tokens: int) -> PromptCalibration | None:
        if not observes_prompt(prefill.policy.name, decode.policy.name, decode.params):
            return None
        return cls(decode, prefill.tokens_seen, prompt_tokens)

    def observe(self, call: AttentionCall, tokens_before: int) -> None:
        """One prefill attention call whose first query sits at position `tokens_before`."""
        first_row = max(0, self.first - tokens_before)
        if first_row < call.query.shape[2]:
            done = max(0, tokens_before - self.first)  # rows observed by earlier forwards
            self.session.observe_rows(self.states[call.layer_idx], call, first_row, done + 1, with_output=False)

    def finish(self) -> None:
        """Set the session's W from what was observed (left pending when nothing was)."""
        self.session.set_window_from(self.states, "prefill")
