"""HiP's selection without its search: the exact top `K_b` key blocks by HiP's own block score.

HiP (arXiv 2406.09827, §3.1-3.2) estimates, per query block and head, the `K_b = k / b_k` key blocks of
largest score (the max of q . k over the block's sampled queries and the block's keys) with a
branch-and-prune search that scores each branch by its center block (`search.py`). The search assumes
attention locality: a key scores close to its neighbours. A needle that is one short spike among
keys that all look alike (a repeated-filler haystack) can fall in a branch whose center is ordinary
and be pruned in the first rounds.

`exact_search` scores every candidate block of every query block (the table `search.py` builds in
its `table` mode) and keeps the `K_b` best. It is the selection HiP's search approximates, not the
paper's method: its scoring is quadratic in the context (the paper's is O(T log T)), so it is for
contexts where the table is affordable, and for measuring what the approximation costs.
"""

from __future__ import annotations

import torch

from kvmux.policies.hip.search import block_score_row, block_score_table, keys_by_offset, sampled_queries
from kvmux.policies.sparse.selection import KeyBlockSelection, slice_bytes


def top_blocks(table: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, num_groups: int) -> KeyBlockSelection:
    """The `num_groups` best blocks of each row of `table` [B, Hq, nQB, n] inside [lo, hi) [nQB], sorted by id.

    Rows with fewer candidates than `num_groups` select all of them and pad with invalid entries."""
    n = table.shape[-1]
    ids = torch.arange(n, device=table.device)
    outside = (ids[None, :] < lo[:, None]) | (ids[None, :] >= hi[:, None])  # [nQB, n]
    scores = table.masked_fill(outside, float("-inf"))
    take = min(num_groups, n)
    best, blocks = scores.topk(take, dim=-1, sorted=False)
    valid = best > float("-inf")
    if take < num_groups:
        pad = (*blocks.shape[:-1], num_groups - take)
        blocks = torch.cat([blocks, blocks.new_zeros(pad)], dim=-1)
        valid = torch.cat([valid, valid.new_zeros(pad)], dim=-1)
    return KeyBlockSelection.from_unordered(blocks, valid)


def exact_search(
    query_blocks: torch.Tensor,
    key: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    num_groups: int,
    block_k: int,
    query_stride: int = 1,
) -> KeyBlockSelection:
    """The top `num_groups` key blocks per query block and head, by the score HiP's search uses.

    query_blocks [B, Hq, nQB, b_q, D] (post-RoPE); key [B, Hkv, Tk, D]; lo/hi [nQB]: candidate key blocks
    [lo, hi) per query block. Query blocks are scored in slices that bound the table's memory."""
    b, hq, nqb = query_blocks.shape[:3]
    queries = sampled_queries(query_blocks, query_stride)
    most = int(hi.max()) if nqb else 0
    if most <= 0:
        empty = torch.zeros(b, hq, nqb, num_groups, dtype=torch.int64, device=key.device)
        return KeyBlockSelection(blocks=empty, valid=empty.bool(), rounds=0)
    if nqb == 1 and queries.shape[3] == 1:  # one query row: score the keys in place
        return top_blocks(block_score_row(queries, key, most, block_k), lo, hi, num_groups)
    split = keys_by_offset(key, most, block_k)
    step = max(1, slice_bytes(key.device.type) // (8 * b * hq * queries.shape[3] * most))
    parts = []
    for i in range(0, nqb, step):
        table = block_score_table(queries[:, :, i : i + step], split, most)
        parts.append(top_blocks(table, lo[i : i + step], hi[i : i + step], num_groups))
    return KeyBlockSelection(
        blocks=torch.cat([p.blocks for p in parts], dim=2), valid=torch.cat([p.valid for p in parts], dim=2), rounds=0
    )
