"""HiP's decode attention between refreshes, with the selected keys gathered once per refresh.

HiP (arXiv 2406.09827) re-searches a decode query's key blocks every `refresh_interval` steps and
reuses the selection in between. The selected tokens are cached keys whose values never change,
so their keys and values are gathered once, when the selection is made (`gather_selection`), and
every later step of the refresh reads them as they are (`decode_attention`): one query row per
sequence attends, in one softmax, to the gathered sinks and selected tokens that lie before its
window, and to its last `window` tokens (a slice of the cache). It computes what the shared key-block
attention (`kvmux.policies.sparse.gather`) computes for a decode row, with a fifth of its tensor
operations and no gather per step. Memory: the gathered keys and values, 2 x (k + sinks) x D per
query head per layer, whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmux.policies.sparse.gather import gather_rows
from kvmux.policies.sparse.selection import KeyBlockSelection


@dataclass(frozen=True, slots=True)
class GatheredSelection:
    """A decode selection's fixed keys, gathered per KV head and query head of its group: the sinks,
    then the selected blocks' tokens."""

    tokens: torch.Tensor  # int64 [B, Hkv, G, S + n]: positions (the sinks first)
    usable: torch.Tensor  # bool [B, Hkv, G, S + n]: a sink, or a selected block's token that is not a sink
    keys: torch.Tensor  # [B, Hkv, G, S + n, D]
    values: torch.Tensor  # [B, Hkv, G, S + n, D]


def gather_selection(
    sel: KeyBlockSelection, key: torch.Tensor, value: torch.Tensor, block_k: int, sinks: int
) -> GatheredSelection:
    """The sinks and the selected blocks' tokens of a one-row selection (blocks [B, Hq, 1, K_b]) over
    key/value [B, Hkv, T, D], with their keys and values."""
    b, hq, _, groups = sel.blocks.shape
    hkv, d = key.shape[1], key.shape[3]
    device = sel.blocks.device
    picked = (sel.blocks[:, :, 0, :, None] * block_k + torch.arange(block_k, device=device)).flatten(-2)
    usable = sel.valid[:, :, 0, :, None].expand(b, hq, groups, block_k).flatten(-2) & (picked >= sinks)
    sink_tokens = torch.arange(sinks, device=device).expand(b, hq, sinks)
    tokens = torch.cat([sink_tokens, picked], dim=-1)  # [B, Hq, S + n]
    usable = torch.cat([torch.ones_like(sink_tokens, dtype=torch.bool), usable], dim=-1)
    shape = (b, hkv, hq // hkv, tokens.shape[-1])
    keys, values = gather_rows(key, tokens), gather_rows(value, tokens)
    return GatheredSelection(tokens.view(shape), usable.view(shape), keys.view(*shape, d), values.view(*shape, d))


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gathered: GatheredSelection,
    window: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row per sequence, query [B, Hq, 1, D] at the last of key/value's T positions, which
    must exceed sinks + window. Returns (output [B, 1, Hq, D], keys attended per row [B, Hq, 1])."""
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    start = length - window  # the row's window; a gathered token before it is attended once
    q = query.reshape(b, hkv, hq // hkv, d) * scaling
    visible = gathered.usable & (gathered.tokens < start)
    fixed_scores = torch.matmul(gathered.keys, q[..., None]).squeeze(-1)  # [B, Hkv, G, S + n]
    fixed_scores = torch.where(visible, fixed_scores, float("-inf"))
    window_scores = torch.matmul(q, key[:, :, start:].transpose(-1, -2))  # [B, Hkv, G, W]
    scores = torch.cat([fixed_scores, window_scores], dim=-1).float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    p_fixed, p_window = probs.split([fixed_scores.shape[-1], window], dim=-1)
    out = torch.matmul(p_fixed[..., None, :], gathered.values).squeeze(-2)
    out += torch.matmul(p_window, value[:, :, start:])
    counts = visible.sum(-1).view(b, hq, 1) + window
    return out.view(b, 1, hq, d), counts
