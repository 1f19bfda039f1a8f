"""Runs the model forward for one policy session: explicit positions, the session's cache and hooks."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from kvmux.models.info import ModelInfo

if TYPE_CHECKING:
    from kvmux.policies.base import PolicySession


class Runner:
    """One place that calls the model: `forward(session, ids)` -> logits."""

    def __init__(self, model: torch.nn.Module, info: ModelInfo, prefill_chunk_tokens: int = 2048):
        self.model = model
        self.info = info
        self.prefill_chunk_tokens = prefill_chunk_tokens
        # transformers 5.24 renamed `past_key_values` to `cache` (old name deprecated)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def forward(
        self,
        session: PolicySession,
        input_ids: torch.Tensor,
        all_logits: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `input_ids` [1, T] through the model with the session's cache.

        Returns logits [1, T, V] if `all_logits`, else [1, 1, V] for the last token. The session's
        `forward_done` runs afterwards (it counts the tokens; evictions happen there, between forwards).
        """
        num_tokens = input_ids.shape[1]
        input_ids = input_ids.to(self.info.device)
        if position_ids is None:
            position_ids = session.next_position_ids(num_tokens)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            kvmux_session=session,
            **{self._cache_kw: session.cache},
        )
        session.forward_done(num_tokens)
        return out.logits.float()

    @torch.inference_mode()
    def decode_batch(self, sessions: list[PolicySession], tokens: list[int]) -> torch.Tensor:
        """One decode step for several sessions in one forward (policies with `batched_decode`)."""
        from kvmux.models.batching import batched_decode_forward

        return batched_decode_forward(self.model, sessions, tokens, self._cache_kw)
