"""One request under a composed preset: the prefill part's session reads the prompt, then hands its
cache to the decode part's session, which generates (the hand-over rules: `handover.py`).

The composed session is what the engine, the scheduler and the runner see. It holds no cache of its own:
every hook (`cache`, `attention`, `next_position_ids`, `forward_done`, `checkpoint`/`restore`) goes to
the part that runs, and every forward of either part goes through the composed session (`_PartRunner`),
so the attention hook finds it, stops it when the request is cancelled (`interrupt`), and applies the
position shift the hand-over set. Forwards outside `prefill` (a stream fed from its first token, tokens
fed after the prompt) run through the decode part.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvmux.policies.attention_call import AttentionCall
from kvmux.policies.base import KVStats, PolicySession, Runner
from kvmux.policies.composed.calibration import PromptCalibration
from kvmux.policies.composed.handover import export_kept, import_kept


class _PartRunner:
    """The runner as a part's session sees it: its forwards run through the composed session."""

    def __init__(self, runner: Runner, composed: ComposedSession):
        self.runner, self.composed = runner, composed

    @property
    def prefill_chunk_tokens(self) -> int:
        return self.runner.prefill_chunk_tokens

    def forward(
        self,
        session: PolicySession,
        input_ids: torch.Tensor,
        all_logits: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if session is not self.composed.active:
            raise RuntimeError("a composed session's forward must come from the part that runs")
        return self.runner.forward(self.composed, input_ids, all_logits, position_ids)


class ComposedSession(PolicySession):
    """The prefill part's session until the prompt is read, the decode part's afterwards."""

    def __init__(self, policy, params, info, request):  # no cache of its own: the parts hold the K/V
        self.policy, self.params, self.info, self.request = policy, params, info, request
        self.prefill_part = policy.prefill_policy.new_session(params.prefill, info, request)
        self.decode_part = policy.decode_policy.new_session(params.decode, info, request)
        self.active: PolicySession = self.decode_part
        self.prefilling = False
        self.handed_over = False
        self.position_shift = 0  # subtracted from the decode part's positions (see handover.py)
        self.handover_tokens: int | None = None  # tokens per layer the decode part started from
        self.prefill_stats: dict[str, Any] | None = None
        self.calibration: PromptCalibration | None = None

    # -- what the runner and the scheduler read go to the running part ------------------------
    @property
    def cache(self) -> Cache:
        return self.active.cache

    @property
    def tokens_seen(self) -> int:
        return self.active.tokens_seen

    @property
    def counts_tokens(self) -> bool:
        return self.active.counts_tokens

    def next_position_ids(self, num_tokens: int) -> torch.Tensor:
        return self.active.next_position_ids(num_tokens) - self.position_shift

    def attention(self, call: AttentionCall) -> torch.Tensor:
        if self.prefilling and self.calibration is not None:
            self.calibration.observe(call, self.prefill_part.tokens_seen)
        return self.active.attention(call)

    def forward_done(self, num_tokens: int) -> None:
        self.active.forward_done(num_tokens)

    def checkpoint(self) -> Any:
        return self.active.checkpoint()

    def restore(self, checkpoint: Any) -> None:
        self.active.restore(checkpoint)

    def prefill_chunk_tokens(self, runner: Runner) -> int:
        return self.active.prefill_chunk_tokens(runner)

    # -- phases ------------------------------------------------------------------------------
    def prefill(self, runner: Runner, input_ids: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        if self.handed_over or self.decode_part.tokens_seen or self.prefill_part.tokens_seen:
            raise RuntimeError("a composed session prefills once, before any other forward")
        self.active, self.prefilling = self.prefill_part, True
        self.calibration = PromptCalibration.for_parts(self.prefill_part, self.decode_part, input_ids.shape[1])
        try:
            logits = yield from self.prefill_part.prefill(_PartRunner(runner, self), input_ids)
        finally:
            self.prefilling = False
        self._hand_over()
        return logits

    def decode(self, runner: Runner, token_id: int) -> torch.Tensor:
        return self.active.decode(_PartRunner(runner, self), token_id)

    def _hand_over(self) -> None:
        prefill, decode = self.prefill_part, self.decode_part
        self.prefill_stats = prefill.stats().as_dict()
        if self.calibration is not None:
            self.calibration.finish()
            self.calibration = None
        kept = export_kept(prefill)
        decode.tokens_seen = prefill.tokens_seen
        self.position_shift = import_kept(decode, kept)
        self.handover_tokens = decode.cache.get_seq_length()
        prefill.close()  # its cache is the decode part's now, or was copied into it
        self.active, self.handed_over = decode, True

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> KVStats:
        """The running part's figures at the top level (what the request holds now), both parts' own
        figures under `prefill` and `decode`; the attention density is the prefill part's when it reports one."""
        running = self.active.stats()
        prefill = self.prefill_stats or (running.as_dict() if self.active is self.prefill_part else {})
        decode = running.as_dict() if self.active is self.decode_part else {}
        density = prefill.get("attention_density", running.attention_density)
        extra: dict[str, Any] = {"prefill": prefill, "decode": decode}
        if self.handed_over:
            extra.update(handover_tokens=self.handover_tokens, position_shift=self.position_shift)
        return KVStats(
            tokens_seen=running.tokens_seen,
            tokens_kept=running.tokens_kept,
            kv_bytes_kept=running.kv_bytes_kept,
            kv_bytes_full=running.kv_bytes_full,
            attention_density=density,
            tokens_retained=running.tokens_retained,
            extra=extra,
        )

    def close(self) -> None:
        self.prefill_part.close()
        self.decode_part.close()
