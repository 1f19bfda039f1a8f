"""Runs the model forward for one policy session: explicit positions, the session's cache and hooks.

Decode steps of Llama-family models take the lean layer loop (`lean_decode.py`) unless
`lean_decode` is off; everything else goes through the model's own forward.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from kvmux.models.info import ModelInfo
from kvmux.models.lean_decode import LeanDecoder

if TYPE_CHECKING:
    from kvmux.policies.base import PolicySession


class Runner:
    """One place that calls the model: `forward(session, ids)` -> logits."""

    def __init__(
        self, model: torch.nn.Module, info: ModelInfo, prefill_chunk_tokens: int = 2048, lean_decode: bool = True
    ):
        self.model = model
        self.info = info
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.lean = LeanDecoder.for_model(model) if lean_decode else None
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
        lean = self.lean_for(input_ids)
        if lean is not None:
            logits = lean.decode(input_ids, position_ids, session.cache, kvmux_session=session)
            session.forward_done(num_tokens)
            return logits.float()
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

    def lean_for(self, input_ids: torch.Tensor) -> LeanDecoder | None:
        """The lean decoder for a decode step (one token per row) while kvmux's attention is installed."""
        if self.lean is None or input_ids.shape[1] != 1:
            return None
        return self.lean if self.model.config._attn_implementation == "kvmux" else None

    @torch.inference_mode()
    def decode_batch(self, sessions: list[PolicySession], tokens: list[int]) -> torch.Tensor:
        """One decode step for several sessions in one forward (policies with `batched_decode`)."""
        from kvmux.models.batching import batched_decode_forward

        ids = torch.tensor(tokens, device=self.info.device)[:, None]
        return batched_decode_forward(self.model, sessions, ids, self._cache_kw, self.lean_for(ids))
