"""HiP's decode attention between refreshes, with the selected keys gathered once per refresh.

HiP (arXiv 2406.09827) re-searches a decode query's key blocks every `refresh_interval` steps and
reuses the selection in between. The selected tokens are cached keys whose values never change,
so their keys and values are gathered once, when the selection is made (`gather_selection`), and
every later step of the refresh reads them as they are (`decode_attention`): one query row per
sequence attends, in one softmax, to the sinks and its last `window` tokens (slices of the cache)
and to the gathered tokens that lie before its window. It computes what the shared key-block
attention (`kvmux.policies.sparse.gather`) computes for a decode row, with a fifth of its tensor
operations and no gather per step. Memory: the gathered keys and values, 2 x k x D per query head
per layer, whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmux.policies.sparse.gather import gather_rows
from kvmux.policies.sparse.selection import KeyBlockSelection


@dataclass(frozen=True, slots=True)
class GatheredSelection:
    """A decode selection's tokens, gathered: per KV head and query head of its group."""

    tokens: torch.Tensor  # int64 [B, Hkv, G, n]: positions of the selected tokens
    usable: torch.Tensor  # bool [B, Hkv, G, n]: a selected block's token that is not a sink
    keys: torch.Tensor  # [B, Hkv, G, n, D]
    values: torch.Tensor  # [B, Hkv, G, n, D]


def gather_selection(
    sel: KeyBlockSelection, key: torch.Tensor, value: torch.Tensor, block_k: int, sinks: int
) -> GatheredSelection:
    """The selected blocks' tokens of a one-row selection (blocks [B, Hq, 1, K_b]) over key/value
    [B, Hkv, T, D], with their keys and values."""
    b, hq, _, groups = sel.blocks.shape
    hkv, d = key.shape[1], key.shape[3]
    offsets = torch.arange(block_k, device=sel.blocks.device)
    tokens = (sel.blocks[:, :, 0, :, None] * block_k + offsets).flatten(-2)  # [B, Hq, n]
    usable = sel.valid[:, :, 0, :, None].expand(b, hq, groups, block_k).flatten(-2) & (tokens >= sinks)
    shape = (b, hkv, hq // hkv, tokens.shape[-1])
    keys, values = gather_rows(key, tokens), gather_rows(value, tokens)
    return GatheredSelection(tokens.view(shape), usable.view(shape), keys.view(*shape, d), values.view(*shape, d))


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gathered: GatheredSelection,
    sinks: int,
    window: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row per sequence, query [B, Hq, 1, D] at the last of key/value's T positions, which
    must exceed sinks + window. Returns (output [B, 1, Hq, D], keys attended per row [B, Hq, 1])."""
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = hq // hkv
    start = length - window  # the row's window; a selected token before it is attended once
    q = query.reshape(b, hkv, groups, d) * scaling
    sink_scores = torch.matmul(q, key[:, :, :sinks].transpose(-1, -2))
    window_scores = torch.matmul(q, key[:, :, start:].transpose(-1, -2))
    selected = gathered.usable & (gathered.tokens < start)
    picked_scores = torch.matmul(gathered.keys, q[..., None]).squeeze(-1)  # [B, Hkv, G, n]
    picked_scores = picked_scores.masked_fill(~selected, float("-inf"))
    scores = torch.cat([sink_scores, picked_scores, window_scores], dim=-1).float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    p_sink, p_picked, p_window = probs.split([sinks, picked_scores.shape[-1], window], dim=-1)
    out = torch.matmul(p_sink, value[:, :, :sinks])
    out += torch.matmul(p_window, value[:, :, start:])
    out += torch.matmul(p_picked[..., None, :], gathered.values).squeeze(-2)
    counts = selected.sum(-1).view(b, hq, 1) + (sinks + window)
    return out.view(b, 1, hq, d), counts
