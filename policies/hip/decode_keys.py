"""HiP's decode attention between refreshes, with the selected keys gathered once per refresh.

HiP (arXiv 2406.09827) re-searches a decode query's key blocks every `refresh_interval` steps and
reuses the selection in between. The selected tokens are cached keys whose values never change,
so their keys and values are gathered once, when the selection is made (`gather_selection`), and
every later step of the refresh reads them as they are (`decode_attention`): one query row per
sequence attends, in one softmax, to the gathered sinks and selected tokens that lie before its
window, and to its last `window` tokens (a slice of the cache). It computes what the shared key-block
attention (`kvmux.policies.sparse.gather`) computes for a decode row.

Which gathered tokens a step sees depends only on where its window starts, so the gather also
precomputes, for the next steps' window starts, an additive mask (0 or -inf) and the keys counted;
a step then runs seven tensor operations: the masked score product (`baddbmm`), the window's scores,
one softmax and two value products. Memory: the gathered keys and values, 2 x (k + sinks) x D per
query head per layer, whatever the context length, plus the masks (`MASK_STEPS` x (k + sinks)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmux.policies.sparse.gather import gather_rows
from kvmux.policies.sparse.selection import KeyBlockSelection

MASK_STEPS = 16  # window starts whose masks one computation covers (a refresh's steps, at most this)
NEVER = torch.iinfo(torch.int64).max  # the limit of a gathered slot no step attends


@dataclass(slots=True)
class GatheredSelection:
    """A decode selection's fixed keys, gathered per KV head and query head of its group: the sinks,
    then the selected blocks' tokens; and the masks of the window starts from `first_start` on."""

    limits: torch.Tensor  # int64 [B, Hkv, G, S + n]: a slot is attended once the window starts past it
    keys: torch.Tensor  # [B, Hkv, G, S + n, D]
    values: torch.Tensor  # [B, Hkv, G, S + n, D]
    first_start: int = 0  # the window start of masks[0]
    masks: torch.Tensor | None = None  # [steps, B * Hq, 1, S + n]: 0 where attended, -inf elsewhere
    counts: torch.Tensor | None = None  # int64 [steps, B, Hq, 1]: gathered slots attended

    def mask_for(self, start: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The additive mask ([B * Hq, 1, S + n]) and keys attended ([B, Hq, 1], window included) of the
        step whose window starts at `start`, computed for `MASK_STEPS` starts at a time."""
        step = start - self.first_start
        if self.masks is None or not 0 <= step < self.masks.shape[0]:
            self.first_start, step = start, 0
            starts = torch.arange(start, start + MASK_STEPS, device=self.limits.device)
            seen = self.limits[None] < starts.view(-1, 1, 1, 1, 1)  # [steps, B, Hkv, G, S + n]
            b, hkv, groups, slots = self.limits.shape
            zero = torch.zeros((), dtype=self.keys.dtype, device=self.keys.device)
            self.masks = torch.where(seen, zero, float("-inf")).view(MASK_STEPS, b * hkv * groups, 1, slots)
            self.counts = (seen.sum(-1) + window).view(MASK_STEPS, b, hkv * groups, 1)
        return self.masks[step], self.counts[step]


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
    limits = torch.cat([sink_tokens, torch.where(usable, picked, NEVER)], dim=-1)
    shape = (b, hkv, hq // hkv, tokens.shape[-1])
    keys, values = gather_rows(key, tokens), gather_rows(value, tokens)
    return GatheredSelection(limits.view(shape), keys.view(*shape, d), values.view(*shape, d))


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
    groups, slots = hq // hkv, gathered.keys.shape[-2]
    start = length - window  # the row's window; a gathered token before it is attended once
    mask, counts = gathered.mask_for(start, window)
    q = query.reshape(b * hkv, groups, d) * scaling
    fixed_keys = gathered.keys.view(b * hq, slots, d)
    fixed_scores = torch.baddbmm(mask, q.view(b * hq, 1, d), fixed_keys.transpose(1, 2))  # [B*Hq, 1, S + n]
    window_keys = key[:, :, start:].reshape(b * hkv, window, d)
    window_scores = torch.bmm(q, window_keys.transpose(1, 2)).view(b * hq, 1, window)
    scores = torch.cat([fixed_scores, window_scores], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    p_fixed, p_window = probs.split([slots, window], dim=-1)
    out = torch.bmm(p_fixed, gathered.values.view(b * hq, slots, d)).view(b * hkv, groups, d)
    window_values = value[:, :, start:].reshape(b * hkv, window, d)
    out = torch.baddbmm(out, p_window.reshape(b * hkv, groups, window), window_values)
    return out.view(b, 1, hq, d), counts
