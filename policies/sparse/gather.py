"""The key-block selection's PyTorch back-ends: sinks + selected key blocks + window, one softmax.

Given a `KeyBlockSelection` and its `SparseGeometry` (`selection.py`), every query attends, causally
and each key once, to the `sinks` first tokens, the tokens of its query block's selected key blocks
that lie at or before (position - window), and its last `window` tokens. Two implementations with
one meaning: `reference` gathers every attended key per query block and head and takes one masked
softmax; `fast` reads sinks and window as shared slices per KV head (a strided view, no copy per
query head) and gathers only the selected blocks. Neither copies the cache: keys are read in place
from a view into a larger buffer (the session's growable cache) as long as each token's values are
contiguous (`dense_rows`). Query blocks are processed in slices that bound
the working memory. `key_block_attention` is the selection's entry point (re-exported by
`attention.py`); the CUDA back-end with the same meaning is `triton_attention.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvmux.policies.sparse.selection import KeyBlockSelection, SparseGeometry, slice_bytes


@dataclass(slots=True)
class Segments:
    """Attended keys of a slice of query blocks: sinks, selected blocks, window; masks per query row."""

    sink_mask: torch.Tensor  # bool [c, b_q, S]
    sel_tokens: torch.Tensor  # int64 [B, Hq, c, n_sel]
    sel_mask: torch.Tensor  # bool [B, Hq, c, b_q, n_sel]
    win_tokens: torch.Tensor  # int64 [c, W] (may run outside the cache where masked)
    win_mask: torch.Tensor  # bool [c, b_q, W]

    def counts(self) -> torch.Tensor:
        """Keys attended per query row: [B, Hq, c, b_q]."""
        fixed = self.sink_mask.sum(-1) + self.win_mask.sum(-1)
        return self.sel_mask.sum(-1) + fixed


def segments(geo: SparseGeometry, sel: KeyBlockSelection, first: int, last: int) -> Segments:
    """Keys that query blocks [first, last) attend, each key once, causal."""
    bq, bk, window, sinks = geo.block_q, geo.block_k, geo.window, geo.sinks
    pos = geo.positions[first * bq : last * bq].view(-1, bq, 1)  # [c, b_q, 1]
    sink_idx = torch.arange(min(sinks, geo.num_keys), device=pos.device)
    sink_mask = sink_idx <= pos
    blocks = sel.blocks[:, :, first:last]
    tokens = (blocks[..., None] * bk + torch.arange(bk, device=pos.device)).flatten(-2)
    valid = sel.valid[:, :, first:last, :, None].expand(*blocks.shape, bk).flatten(-2)
    sel_mask = (valid & (tokens >= sinks))[..., None, :] & (tokens[..., None, :] <= pos - window)
    win_tokens = pos[:, 0] - window + 1 + torch.arange(window + bq - 1, device=pos.device)  # [c, W]
    low = (pos - window).clamp(min=sinks - 1)
    win_mask = (win_tokens[:, None, :] > low) & (win_tokens[:, None, :] <= pos)
    return Segments(sink_mask, tokens, sel_mask, win_tokens, win_mask)


def dense_rows(x: torch.Tensor) -> bool:
    """True when each token's D values of x [B, H, T, D] are contiguous and tokens follow each other, so
    a head's tokens can be read at token strides (a view into a larger cache buffer qualifies)."""
    b, h, t, d = x.shape
    s_b, s_h, s_t, s_d = x.stride()
    return (s_d == 1 or d == 1) and (s_t == d or t == 1) and s_h % d == 0 and s_b % d == 0


def _row_table(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """x [B, H, T, D] as a table of D-wide rows [N, D] over its own storage, without copying it when its
    rows are dense (`dense_rows`), and the row strides of a batch and of a head in that table."""
    b, h, t, d = x.shape
    if not dense_rows(x):
        x = x.contiguous()
    row_b, row_h = x.stride(0) // d, x.stride(1) // d
    rows = (b - 1) * row_b + (h - 1) * row_h + t
    return x.as_strided((rows, d), (d, 1)), row_b, row_h


def gather_rows(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, T, D], tokens [B, H, ...] with H a multiple of Hkv (head h reads KV head h // (H / Hkv),
    or tokens [B, Hkv, ...] directly) -> [B, H, ..., D]."""
    b, hkv, t, d = x.shape
    heads = tokens.shape[1]
    table, row_b, row_h = _row_table(x)
    kv_head = torch.arange(heads, device=x.device) // (heads // hkv)
    base = torch.arange(b, device=x.device)[:, None] * row_b + kv_head[None, :] * row_h
    flat = tokens.clamp(0, t - 1) + base.view(b, heads, *([1] * (tokens.dim() - 2)))
    return table.index_select(0, flat.reshape(-1)).view(*tokens.shape, d)


def _softmax(scores: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    return torch.softmax((scores.float() * scaling).masked_fill(~mask, float("-inf")), dim=-1)


def _reference_slice(qb, key, value, seg: Segments, scaling: float) -> torch.Tensor:
    """One gather of every attended key per query block and head, one masked softmax."""
    b, hq, c, bq, _ = qb.shape
    sinks = seg.sink_mask.shape[-1]
    tokens = torch.cat(
        [
            torch.arange(sinks, device=qb.device).expand(b, hq, c, sinks),
            seg.sel_tokens,
            seg.win_tokens.expand(b, hq, *seg.win_tokens.shape),
        ],
        dim=-1,
    )
    mask = torch.cat(
        [seg.sink_mask.expand(b, hq, *seg.sink_mask.shape), seg.sel_mask, seg.win_mask.expand(b, hq, -1, -1, -1)], -1
    )
    keys, values = gather_rows(key, tokens), gather_rows(value, tokens)
    probs = _softmax(torch.matmul(qb, keys.transpose(-1, -2)), mask, scaling)
    return torch.matmul(probs.to(values.dtype), values)


def _windows(x: torch.Tensor, start: int, count: int, width: int, step: int) -> torch.Tensor:
    """`count` windows of `width` tokens, the first at token `start`, each `step` tokens after the last:
    a strided view of x [B, H, T, D] (rows dense) -> [B, H, count, width, D]."""
    s_b, s_h, s_t, s_d = x.stride()
    size = (x.shape[0], x.shape[1], count, width, x.shape[3])
    return x.as_strided(size, (s_b, s_h, step * s_t, s_t, s_d), x.storage_offset() + start * s_t)


def _fast_slice(qg, key, value, padded, seg: Segments, scaling: float) -> torch.Tensor:
    """Grouped layout [B, Hkv, c, G, b_q, D]: sinks and window are shared per KV head (the window a
    strided view, no copy per query head); only the selected blocks are gathered."""
    b, hkv, c, g, bq, d = qg.shape
    sinks, nsel, width = seg.sink_mask.shape[-1], seg.sel_tokens.shape[-1], seg.win_tokens.shape[-1]
    kpad, vpad, offset = padded
    start = int(seg.win_tokens[0, 0]) + offset
    kwin, vwin = _windows(kpad, start, c, width, bq), _windows(vpad, start, c, width, bq)
    tokens = seg.sel_tokens.view(b, hkv, g, c, nsel).transpose(2, 3)  # [B, Hkv, c, G, n]
    ksel, vsel = gather_rows(key, tokens), gather_rows(value, tokens)
    flat_q = qg.view(b, hkv, c * g * bq, d)
    scores = torch.cat(
        [
            torch.matmul(flat_q, key[:, :, :sinks].transpose(-1, -2)).view(b, hkv, c, g, bq, sinks),
            torch.matmul(qg, ksel.transpose(-1, -2)),
            torch.matmul(qg.view(b, hkv, c, g * bq, d), kwin.transpose(-1, -2)).view(b, hkv, c, g, bq, width),
        ],
        dim=-1,
    )
    sel_mask = seg.sel_mask.view(b, hkv, g, c, bq, nsel).transpose(2, 3)
    mask = torch.cat(
        [
            seg.sink_mask[:, None].expand(c, g, bq, sinks).expand(b, hkv, -1, -1, -1, -1),
            sel_mask,
            seg.win_mask[:, None].expand(c, g, bq, width).expand(b, hkv, -1, -1, -1, -1),
        ],
        dim=-1,
    )
    probs = _softmax(scores, mask, scaling).to(value.dtype)
    p_sink, p_sel, p_win = probs.split([sinks, nsel, width], dim=-1)
    out = torch.matmul(p_sel, vsel)
    out += torch.matmul(p_sink.reshape(b, hkv, c * g * bq, sinks), value[:, :, :sinks]).view(b, hkv, c, g, bq, d)
    out += torch.matmul(p_win.reshape(b, hkv, c, g * bq, width), vwin).view(b, hkv, c, g, bq, d)
    return out


def key_block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sel: KeyBlockSelection,
    geo: SparseGeometry,
    scaling: float,
    backend: Literal["fast", "reference"] = "fast",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `query` [B, Hq, Tq, D] over key/value [B, Hkv, Tk, D]: sinks + selected blocks + window.

    Returns (output [B, Tq, Hq, D], keys attended per query row [B, Hq, Tq]).
    """
    if backend not in ("fast", "reference"):
        raise ValueError(f"unknown backend {backend!r}")
    b, hq, tq, d = query.shape
    hkv = key.shape[1]
    qb = geo.query_blocks(query)
    width = geo.window + geo.block_q - 1
    padded = None
    if backend == "fast":
        # pad the cache only where a window runs before key 0 or past the last key (prefill edges)
        front = max(0, geo.window - 1 - (geo.num_keys - tq))
        back = geo.num_blocks * geo.block_q - tq
        if front or back or not (dense_rows(key) and dense_rows(value)):
            pad = (0, 0, front, back)
            padded = (torch.nn.functional.pad(key, pad), torch.nn.functional.pad(value, pad), front)
        else:
            padded = (key, value, 0)
        qb = qb.view(b, hkv, hq // hkv, geo.num_blocks, geo.block_q, d).transpose(2, 3).contiguous()
    per_block = b * hq * (sel.blocks.shape[-1] * geo.block_k + width + geo.sinks) * (2 * d + 3 * geo.block_q) * 4
    step = max(1, slice_bytes(query.device.type) // max(per_block, 1))
    outs, counts = [], []
    for first in range(0, geo.num_blocks, step):
        last = min(first + step, geo.num_blocks)
        seg = segments(geo, sel, first, last)
        if backend == "fast":
            outs.append(_fast_slice(qb[:, :, first:last].contiguous(), key, value, padded, seg, scaling))
        else:
            outs.append(_reference_slice(qb[:, :, first:last], key, value, seg, scaling))
        counts.append(seg.counts())
    out = torch.cat(outs, dim=2)
    if backend == "fast":  # [B, Hkv, nQB, G, b_q, D] -> [B, Tq, Hq, D]
        out = out.permute(0, 2, 4, 1, 3, 5).reshape(b, -1, hq, d)[:, :tq]
    else:  # [B, Hq, nQB, b_q, D] -> [B, Tq, Hq, D]
        out = out.view(b, hq, -1, d)[:, :, :tq].transpose(1, 2)
    count = torch.cat(counts, dim=2).view(b, hq, -1)[:, :, :tq]
    return out.contiguous(), count
