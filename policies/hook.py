"""The one attention function kvmux registers with transformers, and its mask function.

`install_attention(model)` registers the name "kvmux" in `AttentionInterface` and (so that
transformers still builds padding and sliding-window masks) in `AttentionMaskInterface`, then
switches the model to it. A plain bottom-right causal mask is not built at all (`causal_or_none`):
every attention path reads None as exactly that mask, and the dense path then avoids
materialising it (see `dense.sdpa`). The function finds the request's
session through the `kvmux_session` keyword passed to the model's forward and delegates to
`session.attention(...)`; without a session it is plain SDPA. Before each layer it asks the
session's `interrupt` callback, so a cancelled request stops at the next layer boundary; in a
batched decode a row's failure is tagged with its row (`BatchRowError`) so only that request fails.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import causal_mask_function, sdpa_mask

from kvmux.policies.base import AttentionCall, StepInterrupted
from kvmux.policies.dense import sdpa

ATTENTION_NAME = "kvmux"


def kvmux_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > -1  # additive float mask -> boolean (0 = keep)
    batch = kwargs.get("kvmux_batch")
    if batch is not None:  # batched decode: each row attends through its own session
        rows = batch.rows[module.layer_idx]
        outs = []
        for i, (session, (k, v)) in enumerate(zip(batch.sessions, rows, strict=True)):
            with batch.row(i):
                outs.append(session.attention(AttentionCall(module.layer_idx, query[i : i + 1], k, v, None, scale)))
        return torch.cat(outs, dim=0), None
    session = kwargs.get("kvmux_session")
    if session is None:
        return sdpa(query, key, value, attention_mask, scale), None
    if session.interrupt is not None and session.interrupt():
        raise StepInterrupted(f"stopped before layer {module.layer_idx}")
    call = AttentionCall(
        layer_idx=module.layer_idx,
        query=query,
        key=key,
        value=value,
        mask=attention_mask,
        scaling=scale,
        position_ids=kwargs.get("position_ids"),
    )
    return session.attention(call), None


def causal_or_none(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' SDPA mask, or None when it would be the plain causal mask of queries that are the
    last `q_length` of `kv_length` keys (no padding, no sliding window): kvmux's attention reads None so."""
    plain = attention_mask is None and mask_function is causal_mask_function and kv_offset == 0
    if plain and q_offset + q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


def install_attention(model: nn.Module) -> None:
    """Register the kvmux attention (idempotent) and switch `model` to it."""
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, kvmux_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, causal_or_none)
    model.set_attn_implementation(ATTENTION_NAME)
