"""Exact fp32 softmax attention of grouped query heads over un-repeated keys, as ActQKV computes it.

Queries come as [Hq, w, D] and keys/values as [Hkv, n, D] (GQA: Hq = g x Hkv; keys are never
copied per query head). `merged_attention` takes one softmax over the local and the global keys
of a window (the exact log-sum-exp merge of the two parts; arXiv 2502.13542, step 6 of the
algorithm in `policy.py`) and returns the attention the local keys received, which the context
memory turns into block representatives.
"""

from __future__ import annotations

import torch


def grouped_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax [Hkv, g, w, n] of grouped queries q [Hq, w, D] over keys k [Hkv, n, D] (causal if mask None)."""
    hkv, w = k.shape[0], q.shape[1]
    qg = q.float().reshape(hkv, -1, q.shape[-1])
    logits = (qg @ k.float().transpose(1, 2) * scaling).view(hkv, -1, w, k.shape[1])
    if mask is None:
        mask = torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def weighted_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs [Hkv, g, w, n] x values [Hkv, n, D] -> [Hq, w, D]."""
    hkv, g, w, n = probs.shape
    return (probs.reshape(hkv, g * w, n) @ v.float()).view(hkv * g, w, -1)


def merged_attention(
    queries: tuple[torch.Tensor, torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    masks: list[torch.Tensor],
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over local keys (keys[0]) and global keys (keys[1], if any), each with its own queries.

    Returns the output [Hq, w, D] and the attention each local key received, summed over the
    window's queries: [Hq, n_local_keys].
    """
    hkv, w = keys[0].shape[0], queries[0].shape[1]
    logits = []
    for q, key, mask in zip(queries, keys, masks, strict=False):
        qg = (q.float() * scaling).reshape(hkv, -1, q.shape[-1])
        part = (qg @ key.float().transpose(1, 2)).view(hkv, -1, w, key.shape[1])
        logits.append(part.masked_fill_(~mask, float("-inf")))
    probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    n_loc = keys[0].shape[1]
    received = probs[..., :n_loc].sum(dim=2).reshape(-1, n_loc)
    out = weighted_values(probs[..., :n_loc], values[0])
    if len(keys) > 1:
        out = out + weighted_values(probs[..., n_loc:], values[1])
    return out, received
