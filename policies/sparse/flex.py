"""The block grid's flex_attention back-end: `torch.nn.attention.flex_attention` with a `BlockMask`, compiled.

The mask is built from a normalised grid (`grid.py`): off-diagonal cells as full blocks, diagonal
cells masked by a causal `mask_mod`. The function is compiled with `torch.compile(dynamic=True)`:
inductor C++ on CPU, Triton on CUDA. Queries are padded in front to the block grid, lengths to block
multiples, and the keys by one spare block (so the padded key length always exceeds the query
length), so one compiled graph serves every length, one-pass or chunked. A shape bucket is (device,
dtype, batch 1 or not, heads, head dim, block size). Compiling takes tens of seconds on an idle CPU
the first time in a process (the inductor cache on disk makes later processes faster), seconds on
CUDA. Same meaning as the eager back-end (`eager.py`); the tests assert they agree.

The compiled function and the "flex is unusable on this device" flag (`flex_state`) are
process-wide caches of compiled code, not request state.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kvmux.policies.sparse.eager import pad_queries
from kvmux.policies.sparse.grid import diagonal_blocks, first_query_block, num_blocks


class FlexState:
    """Whether the compiled flex path works on a device type (set False after a failure)."""

    def __init__(self) -> None:
        self.usable = True


@functools.cache
def flex_state(device_type: str) -> FlexState:
    return FlexState()


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_block_mask(sel: torch.Tensor, num_queries: int, num_keys: int, block_size: int):
    """BlockMask for a normalised selection [B, H, nqb, nkb'] over queries padded to the grid.

    nkb' may exceed the key blocks of `num_keys` (spare, unselected blocks); the grid is nkb' wide.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bs = block_size
    nqb, nkb = sel.shape[-2:]
    first = first_query_block(num_queries, num_keys, bs)
    diag = F.pad(diagonal_blocks(num_queries, num_keys, bs, sel.device), (0, nkb - num_blocks(num_keys, bs)))
    full = sel & ~diag
    full_counts = full.sum(-1, dtype=torch.int32)
    full_idx = torch.argsort((~full).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    shape = sel.shape[:2]
    diag_idx = torch.zeros(nqb, nkb, dtype=torch.int32, device=sel.device)
    diag_idx[:, 0] = first + torch.arange(nqb, device=sel.device, dtype=torch.int32)
    diag_counts = torch.ones(*shape, nqb, dtype=torch.int32, device=sel.device)
    q_base = torch.tensor(first * bs, device=sel.device)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + q_base

    return BlockMask.from_kv_blocks(
        diag_counts,
        diag_idx.expand(*shape, nqb, nkb).contiguous(),
        full_counts,
        full_idx,
        BLOCK_SIZE=bs,
        mask_mod=causal,
        seq_lengths=(nqb * bs, nkb * bs),
    )


def flex_block_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sel: torch.Tensor, block_size: int, scaling: float
) -> torch.Tensor:
    """query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D], a normalised grid [B, Hq, nqb, nkb] -> [B, Tq, Hq, D]."""
    tq, tk = query.shape[2], key.shape[2]
    nkb = sel.shape[-1]
    qp, front = pad_queries(query, tk, block_size)
    # one spare (never selected) key block keeps the padded key length above the query length, so
    # Tq == Tk and Tq < Tk trace to the same graph (no duck-sized "equal lengths" specialisation)
    pad_k = (nkb + 1) * block_size - tk
    kp = F.pad(key, (0, 0, 0, pad_k))
    vp = F.pad(value, (0, 0, 0, pad_k))
    mask = flex_block_mask(F.pad(sel, (0, 1)), tq, tk, block_size)
    enable_gqa = query.shape[1] != key.shape[1]
    # a few graph variants per model (Tq == Tk or not, dtype); never fall back to uncompiled flex
    with torch._dynamo.config.patch(recompile_limit=64):
        out = _compiled_flex()(qp, kp, vp, block_mask=mask, scale=scaling, enable_gqa=enable_gqa)
    return out[:, :, front : front + tq].transpose(1, 2).contiguous()
