"""HiP's hierarchical branch-and-prune top-k key-block search (arXiv 2406.09827, §3.1-3.2).

For one query block, the candidate key blocks `[lo, hi)` are split into `K_b = k / b_k` equal
groups. Every round splits each group into two halves (sizes `floor(s/2)` and `s - floor(s/2)`),
scores each half by its *center* key block (the max of `q . k` over the block's sampled queries
and the representative block's keys; an empty half scores -inf), and keeps the `K_b` best of the
`2 K_b` halves. Rounds repeat until every group holds one block (about log2(n / K_b) rounds);
the surviving groups are the selected key blocks.

Two ways to score the representatives, which select the same blocks:
- `gather` (the paper's O(T log T) form): each round gathers the representative blocks' keys.
- `table`: one batched matmul scores every candidate block of a query block up front and each
  round reads its representatives from that table; it touches more keys but is a plain GEMM, which
  is faster than the gathers while the candidate range is short enough: on CPU up to 64 x `2 K_b`
  blocks (32K tokens with the defaults), elsewhere up to 4 x `2 K_b`. A decode row's table is one
  matmul over the keys as they lie (`block_score_row`), without the per-offset key copies.

A decode refresh searches one query row per sequence with `search_row`: the same selection, from a
candidate range the caller computes on the host, with fewer and cheaper operations per round.
"""

from __future__ import annotations

from typing import Literal

import torch

from kvmux.policies.sparse.selection import KeyBlockSelection, slice_bytes

ScoreMode = Literal["auto", "gather", "table"]


def initial_groups(lo: torch.Tensor, hi: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split blocks [lo, hi) (per query block, [nQB]) into `num_groups` equal groups: (starts, sizes) [nQB, K_b]."""
    count = (hi - lo).clamp(min=0)
    j = torch.arange(num_groups + 1, device=lo.device)
    bounds = lo[:, None] + torch.div(j[None, :] * count[:, None], num_groups, rounding_mode="floor")
    return bounds[:, :-1], bounds[:, 1:] - bounds[:, :-1]


def sampled_queries(query_blocks: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, Hq, nQB, b_q, D] -> every `stride`-th query of each block."""
    return query_blocks[..., ::stride, :]


def _gather_scores(queries: torch.Tensor, key: torch.Tensor, rep: torch.Tensor, block_k: int) -> torch.Tensor:
    """Score representative blocks by gathering their keys.

    queries [B, Hq, nQB, S, D]; key [B, Hkv, Tk, D]; rep [B, Hq, nQB, C] block ids. Returns [B, Hq, nQB, C]
    (max over sampled queries and block keys; a block running past the cache reuses its last key).
    """
    b, hq, nqb, c = rep.shape
    hkv, tk, d = key.shape[1], key.shape[2], key.shape[3]
    groups = hq // hkv
    offs = torch.arange(block_k, device=rep.device)
    tokens = rep[..., None] * block_k + offs  # [B, Hq, nQB, C, b_k]
    tokens = tokens.clamp(min=0, max=tk - 1)
    kv_head = torch.arange(hq, device=rep.device) // groups
    base = (torch.arange(b, device=rep.device)[:, None] * hkv + kv_head[None, :]) * tk  # [B, Hq]
    flat = (tokens + base.view(b, hq, 1, 1, 1)).reshape(-1)
    keys = key.reshape(-1, d).index_select(0, flat).view(b, hq, nqb, c * block_k, d)
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float()  # [B, Hq, nQB, S, C*b_k]
    return scores.amax(dim=-2).view(b, hq, nqb, c, block_k).amax(dim=-1)


def keys_by_offset(key: torch.Tensor, num_blocks: int, block_k: int) -> list[torch.Tensor]:
    """[B, Hkv, Tk, D] -> b_k contiguous [B, Hkv, num_blocks, D]: key `offset` of every block (a block
    running past the cache repeats the last key, which leaves its max unchanged)."""
    b, hkv, tk, d = key.shape
    need = num_blocks * block_k
    keys = key[:, :, : min(need, tk)]
    if keys.shape[2] < need:
        keys = torch.cat([keys, keys[:, :, -1:].expand(b, hkv, need - keys.shape[2], d)], dim=2)
    keys = keys.view(b, hkv, num_blocks, block_k, d)
    return [keys[:, :, :, offset].contiguous() for offset in range(block_k)]


def block_score_table(queries: torch.Tensor, split_keys: list[torch.Tensor], num_blocks: int) -> torch.Tensor:
    """Score of every key block < `num_blocks` for every query block: [B, Hq, nQB, num_blocks].

    queries [B, Hq, nQB, S, D]; split_keys from `keys_by_offset`. The score is the max of q . k over the
    block's sampled queries and the block's keys (the same quantity `_gather_scores` computes). One matmul
    per key offset inside a block keeps every reduction elementwise or contiguous.
    """
    b, hq, nqb, s, d = queries.shape
    hkv = split_keys[0].shape[1]
    groups = hq // hkv
    q = queries.reshape(b, hkv, groups * nqb * s, d)
    table = None
    for keys in split_keys:
        part = torch.matmul(q, keys[:, :, :num_blocks].transpose(-1, -2))  # [B, Hkv, G*nQB*S, nKB]
        table = part if table is None else torch.maximum(table, part, out=table)
    return table.view(b, hq, nqb, s, num_blocks).amax(dim=-2).float()


def block_score_row(queries: torch.Tensor, key: torch.Tensor, num_blocks: int, block_k: int) -> torch.Tensor:
    """`block_score_table` for a single query row (a decode step): one matmul over the keys as they lie
    and a max over each block's b_k scores, with no per-offset copies of the keys. [B, Hq, 1, num_blocks]."""
    b, hq, _, _, d = queries.shape
    hkv, tk = key.shape[1], key.shape[2]
    need = num_blocks * block_k
    q = queries.reshape(b, hkv, hq // hkv, d)
    scores = torch.matmul(q, key[:, :, : min(need, tk)].transpose(-1, -2))  # [B, Hkv, G, <=need]
    if scores.shape[-1] < need:  # a block running past the cache repeats the last key
        scores = torch.cat([scores, scores[..., -1:].expand(*scores.shape[:-1], need - scores.shape[-1])], dim=-1)
    per_offset = scores.view(b, hq, 1, num_blocks, block_k)
    best = per_offset[..., 0]
    for offset in range(1, block_k):  # an elementwise max per offset: cheaper than a max over a short last dim
        best = torch.maximum(best, per_offset[..., offset])
    return best.float()


# `auto` scores with the table while the candidate blocks are at most this many times the blocks
# one gather round scores (2 K_b). On CPU gathers are memory-bound copies and the table's GEMM
# wins up to long ranges (docs/results/hip.md, "Table scoring on CPU"); on CUDA the gathers are
# cheap and the table's O(T^2) work is not.
TABLE_RANGE_FACTOR = {"cpu": 64}
DEFAULT_TABLE_RANGE_FACTOR = 4


def choose_score_mode(
    mode: ScoreMode, candidates: int, num_groups: int, device_type: str
) -> Literal["gather", "table"]:
    """`auto`: the table while the candidate blocks are at most a device-dependent multiple of 2 K_b."""
    if mode != "auto":
        return mode
    factor = TABLE_RANGE_FACTOR.get(device_type, DEFAULT_TABLE_RANGE_FACTOR)
    return "table" if candidates <= factor * 2 * num_groups else "gather"


def hip_search(
    query_blocks: torch.Tensor,
    key: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    num_groups: int,
    block_k: int,
    query_stride: int = 1,
    score_mode: ScoreMode = "auto",
) -> KeyBlockSelection:
    """Branch-and-prune top-`num_groups` key blocks for each query block and query head.

    query_blocks [B, Hq, nQB, b_q, D] (post-RoPE); key [B, Hkv, Tk, D]; lo/hi [nQB] int64: candidate
    key blocks [lo, hi) per query block (the caller excludes sinks and the sliding window). Query
    blocks are searched in slices that bound the working memory.
    """
    b, hq, nqb = query_blocks.shape[:3]
    queries = sampled_queries(query_blocks, query_stride)
    most = int((hi - lo).max().clamp(min=0)) if nqb else 0
    mode = choose_score_mode(score_mode, most, num_groups, key.device.type)
    if mode == "table":
        per_block = 8 * b * hq * queries.shape[3] * max(int(hi.max()), 1)
    else:
        per_block = 4 * b * hq * 2 * num_groups * block_k * (key.shape[-1] + queries.shape[3])
    step = max(1, slice_bytes(key.device.type) // per_block)
    max_hi = int(hi.max()) if nqb else 0
    split, row_table = None, None
    if mode == "table" and max_hi > 0:
        if nqb == 1 and queries.shape[3] == 1:  # one query row: score the keys in place
            row_table = block_score_row(queries, key, max_hi, block_k)
        else:
            split = keys_by_offset(key, max_hi, block_k)
    parts = [
        _search_slice(
            queries[:, :, i : i + step], key, split, lo[i : i + step], hi[i : i + step], num_groups, block_k, row_table
        )
        for i in range(0, nqb, step)
    ]
    return KeyBlockSelection(
        blocks=torch.cat([p.blocks for p in parts], dim=2),
        valid=torch.cat([p.valid for p in parts], dim=2),
        rounds=max(p.rounds for p in parts),
    )


def _search_slice(
    queries: torch.Tensor,
    key: torch.Tensor,
    split_keys: list[torch.Tensor] | None,
    lo: torch.Tensor,
    hi: torch.Tensor,
    num_groups: int,
    block_k: int,
    table: torch.Tensor | None = None,
) -> KeyBlockSelection:
    b, hq, nqb = queries.shape[:3]
    starts, sizes = initial_groups(lo, hi, num_groups)
    starts = starts.expand(b, hq, nqb, num_groups).contiguous()
    sizes = sizes.expand(b, hq, nqb, num_groups).contiguous()
    max_hi = int(hi.max())
    if table is None and split_keys is not None and max_hi > 0:
        table = block_score_table(queries, split_keys, max_hi)
    last_block = (hi - 1).clamp(min=0).view(1, 1, nqb, 1)
    rounds = 0
    while bool((sizes > 1).any()):
        left = torch.div(sizes, 2, rounding_mode="floor")
        cand_start = torch.cat([starts, starts + left], dim=-1)
        cand_size = torch.cat([left, sizes - left], dim=-1)
        rep = torch.minimum(cand_start + torch.div(cand_size, 2, rounding_mode="floor"), last_block)  # center
        scores = table.gather(-1, rep) if table is not None else _gather_scores(queries, key, rep, block_k)
        scores = scores.masked_fill(cand_size == 0, float("-inf"))
        keep = scores.topk(num_groups, dim=-1, sorted=False).indices  # the set matters, not its order
        starts, sizes = cand_start.gather(-1, keep), cand_size.gather(-1, keep)
        rounds += 1
    return KeyBlockSelection.from_unordered(starts, sizes == 1, rounds)


def search_row(
    query: torch.Tensor, key: torch.Tensor, lo: int, hi: int, num_groups: int, block_k: int
) -> KeyBlockSelection:
    """`hip_search` for one decode row per sequence, with its candidate range [lo, hi) known on the host.

    query [B, Hq, 1, D]; key [B, Hkv, Tk, D]. It scores the row's block table in place
    (`block_score_row`) and keeps each group as a [start, end) pair, halved with shifts, so a round is a
    dozen small operations with no geometry tensors. Selects the blocks `hip_search` selects (table
    mode), in the order the last round left them rather than sorted.
    """
    b, hq = query.shape[:2]
    if hi <= lo:
        empty = torch.zeros(b, hq, 1, num_groups, dtype=torch.int64, device=query.device)
        return KeyBlockSelection(blocks=empty, valid=empty.bool(), rounds=0)
    table = block_score_row(query[:, :, :, None], key, hi, block_k)  # [B, Hq, 1, hi]
    bounds = torch.arange(num_groups + 1, device=query.device).mul_(hi - lo)
    bounds = bounds.div_(num_groups, rounding_mode="floor").add_(lo)
    spans = torch.stack([bounds[:-1], bounds[1:]]).expand(b, hq, 1, 2, num_groups)  # [..., (start, end), K_b]
    rounds = 0
    while True:
        starts, ends = spans[..., 0, :], spans[..., 1, :]
        sizes = ends - starts
        if not bool((sizes > 1).any()):
            break
        mids = starts + (sizes >> 1)  # the left half holds floor(size / 2) blocks
        halves = torch.cat([starts, mids, mids, ends], dim=-1).view(b, hq, 1, 2, 2 * num_groups)
        centers = (halves.sum(-2) >> 1).clamp_(max=hi - 1)  # each half's center block
        scores = table.gather(-1, centers).masked_fill_(halves[..., 0, :] == halves[..., 1, :], float("-inf"))
        keep = scores.topk(num_groups, dim=-1, sorted=False).indices
        spans = halves.gather(-1, keep[..., None, :].expand(b, hq, 1, 2, num_groups))
        rounds += 1
    valid = sizes == 1
    return KeyBlockSelection(blocks=torch.where(valid, starts, 0), valid=valid, rounds=rounds)
