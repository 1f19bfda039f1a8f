"""FlexPrefill's per-head pattern selection (arXiv 2502.20766): vertical-slash or query-aware cells of the block grid.

For one prefill forward of one layer, per query head (block size bs):
1. Probe: the last bs queries attend (exactly, causally) to all keys. Their mean attention per
   key is the *vertical* distribution; their attention summed along each diagonal (distance
   query - key) and divided by the number of probe rows is the *slash* distribution.
2. Budgets: the fewest tokens whose sorted probe mass reaches `gamma`, computed separately for
   vertical and slash, converted to blocks as `tokens // block_size + 1` and clamped to
   [ceil(min_budget / bs), ceil(max_budget / bs)].
3. Pattern test: the mean probe query against block-mean keys gives an estimated block
   distribution; its square-root Jensen-Shannon distance to the probe's true block distribution
   (the vertical mass pooled per key block) is compared with `tau`. Below `tau` the cheap
   estimate is trusted and the head is *query-aware*: its vertical and slash budgets drop to the
   minimum and it adds the cells of a block-level attention map (block-mean queries x block-mean
   keys, row softmax over causal blocks), taken in descending order while their cumulative
   mass stays within gamma x (number of query blocks). Otherwise the head is *vertical-slash*.
4. Vertical-slash cells: the top key blocks by vertical mass (whole columns) and the top block
   diagonals by slash mass. Key block 0 and the main diagonal are always kept.
The result is a block grid of the sparse layer (`kvmux.policies.sparse.grid`); the deviations from
the reference code (budget divisor, slash pooling, NaN-safe distance) are listed in `policy.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvmux.policies.flexprefill.params import FlexPrefillParams
from kvmux.policies.sparse.grid import first_query_block, num_blocks, query_blocks


@dataclass
class HeadPatterns:
    """Each head's pattern (query-aware or vertical-slash), budgets and cells, as chosen for one forward of one
    layer (batch element)."""

    blocks: torch.Tensor  # bool [Hq, nqb, nkb] (before adding the diagonal / dropping non-causal)
    query_aware: torch.Tensor  # bool [Hq]
    n_vertical: torch.Tensor  # long [Hq], key blocks kept as columns
    n_slash: torch.Tensor  # long [Hq], block diagonals kept
    jsd: torch.Tensor  # float [Hq], sqrt Jensen-Shannon distance of the estimate


def coverage_count(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Tokens needed to cover `gamma` of the mass of x [..., N]: #(sorted cumsum <= gamma) + 1, <= N."""
    cum = torch.cumsum(torch.sort(x, dim=-1, descending=True).values, dim=-1)
    return ((cum <= gamma).sum(-1) + 1).clamp(max=x.shape[-1])


def budget_blocks(x: torch.Tensor, gamma: float, block_size: int, lo: int, hi: int) -> torch.Tensor:
    """Blocks to keep for a token distribution: coverage // block_size + 1, clamped to [lo, hi]."""
    return (coverage_count(x, gamma) // block_size + 1).clamp(min=lo, max=hi)


def sqrt_js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) along the last dim; 0 log 0 = 0."""
    m = (p + q) / 2
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * kl_pm + 0.5 * kl_qm).clamp(min=0).sqrt()


def block_pool(x: torch.Tensor, block_size: int, mean: bool = False) -> torch.Tensor:
    """Sum (or mean over the real members) of blocks along dim -2 of x [..., N, D] -> [..., nb, D]."""
    n = x.shape[-2]
    nb = num_blocks(n, block_size)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - n))
    pooled = padded.unflatten(-2, (nb, block_size)).sum(-2)
    if mean:
        counts = torch.full((nb,), float(block_size), device=x.device, dtype=pooled.dtype)
        counts[-1] = n - (nb - 1) * block_size
        pooled = pooled / counts[:, None]
    return pooled


def diagonal_sums(probs: torch.Tensor, num_keys: int) -> torch.Tensor:
    """probs [H, m, Tk] of the last m queries -> [H, Tk]: mass at distance d = query pos - key pos."""
    h, m, tk = probs.shape
    probs = probs.contiguous()
    # distances 0 .. Tk-m: a skewed view with row stride Tk+1 puts row i's key i+c (distance Tk-m-c,
    # never in the future) in column c, so summing over rows gives the mass per distance, no copy
    span = tk - m + 1
    skew = probs.as_strided((h, m, span), (m * tk, tk + 1, 1), storage_offset=probs.storage_offset())
    near = skew.sum(1).flip(-1)
    if m == 1:
        return near
    # distances Tk-m+1 .. Tk-1 (key j < row i): the same skew over the first m-1 keys, left-padded by m-1
    # zeros so that rows whose key would fall before key 0 read a zero
    head = torch.nn.functional.pad(probs[:, :, : m - 1], (m - 1, 0))  # [H, m, 2m-2]
    w = 2 * m - 2
    far = head.as_strided((h, m, m - 1), (m * w, w + 1, 1), storage_offset=head.storage_offset()).sum(1)
    return torch.cat([near, far.flip(-1)], dim=-1)


def probe(query: torch.Tensor, key: torch.Tensor, scaling: float, rows: int) -> torch.Tensor:
    """Exact causal attention [Hq, rows, Tk] (fp32) of the last `rows` queries over all keys."""
    hq, _, d = query.shape
    hkv, tk, _ = key.shape
    g = hq // hkv
    last = query[:, -rows:].float().reshape(hkv, g * rows, d)
    scores = torch.matmul(last, key.float().transpose(-1, -2)).view(hq, rows, tk).mul_(scaling)
    # only the last `rows` keys can lie in a probe query's future: mask that corner alone
    future = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu(1)
    scores[:, :, tk - rows :].masked_fill_(future, float("-inf"))
    return torch.softmax(scores, dim=-1)


def query_aware_cells(
    query: torch.Tensor, key_means: torch.Tensor, num_keys: int, scaling: float, block_size: int, gamma: float
) -> torch.Tensor:
    """Block map for the heads of query [H, Tq, D] (last Tq of num_keys), key_means [H, nkb, D].

    Block-mean queries (over the real queries of each absolute block) x block-mean keys, row
    softmax over causal blocks; the most probable cells are kept while their cumulative mass is
    <= gamma x nqb (a global, not per-row, rule). Returns bool [H, nqb, nkb].
    """
    h, tq, d = query.shape
    nkb = key_means.shape[1]
    first = first_query_block(tq, num_keys, block_size)
    front = (num_keys - tq) % block_size
    positions = torch.nn.functional.pad(torch.ones(tq, 1, device=query.device), (0, 0, front, 0))
    q_means = block_pool(torch.nn.functional.pad(query.float(), (0, 0, front, 0)), block_size)
    q_means = q_means / block_pool(positions, block_size)
    nqb = q_means.shape[1]
    rows = first + torch.arange(nqb, device=query.device)
    causal = torch.arange(nkb, device=query.device)[None, :] <= rows[:, None]
    scores = torch.matmul(q_means, key_means.float().transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).flatten(1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    keep_sorted = torch.cumsum(sorted_p, dim=-1) <= gamma * nqb
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep.view(h, nqb, nkb)


def select_blocks(query: torch.Tensor, key: torch.Tensor, scaling: float, params: FlexPrefillParams) -> HeadPatterns:
    """FlexPrefill's cells for one batch element: query [Hq, Tq, D] (last Tq of Tk), key [Hkv, Tk, D]."""
    hq, tq, _ = query.shape
    hkv, tk, _ = key.shape
    bs = params.block_size
    nkb, nqb = num_blocks(tk, bs), query_blocks(tq, tk, bs)
    lo = math.ceil(params.min_budget / bs)
    hi = nkb if params.max_budget is None else min(nkb, math.ceil(params.max_budget / bs))
    lo = max(1, min(lo, hi))  # at least one block: the sink column and the main diagonal
    rows = min(bs, tq)
    g = hq // hkv

    vertical = torch.empty(hq, tk, device=query.device)
    slash = torch.empty(hq, tk, device=query.device)
    for kv in range(hkv):  # one KV group at a time bounds the probe's memory (Hq/Hkv x bs x Tk)
        heads = slice(kv * g, (kv + 1) * g)
        probs = probe(query[heads], key[kv : kv + 1], scaling, rows)
        vertical[heads] = probs.mean(1)
        slash[heads] = diagonal_sums(probs, tk) / rows
        del probs
    n_vertical = budget_blocks(vertical, params.gamma, bs, lo, hi)
    n_slash = budget_blocks(slash, params.gamma, bs, lo, hi)
    v_blocks = block_pool(vertical[..., None], bs)[..., 0]  # [Hq, nkb], sums to 1
    s_blocks = block_pool(slash[..., None], bs)[..., 0]  # [Hq, nkb], index = block offset

    key_means = block_pool(key.float(), bs, mean=True).repeat_interleave(g, dim=0)  # [Hq, nkb, D]
    probe_mean = query[:, -rows:].float().mean(1, keepdim=True)  # [Hq, 1, D]
    estimate = torch.softmax(torch.matmul(probe_mean, key_means.transpose(-1, -2))[:, 0] * scaling, dim=-1)
    jsd = sqrt_js_distance(estimate, v_blocks)
    query_aware = jsd < params.tau
    n_vertical = torch.where(query_aware, lo, n_vertical)
    n_slash = torch.where(query_aware, lo, n_slash)

    v_blocks[:, 0] = float("inf")  # the sink block
    s_blocks[:, 0] = float("inf")  # the main diagonal
    columns = top_mask(v_blocks, n_vertical)
    offsets = top_mask(s_blocks, n_slash)
    first = first_query_block(tq, tk, bs)
    dist = (first + torch.arange(nqb, device=query.device))[:, None] - torch.arange(nkb, device=query.device)[None, :]
    on_slash = offsets[:, dist.clamp(min=0)] & (dist >= 0)
    blocks = columns[:, None, :] | on_slash
    if bool(query_aware.any()):
        qa = query_aware.nonzero()[:, 0]
        blocks[qa] |= query_aware_cells(query[qa], key_means[qa], tk, scaling, bs, params.gamma)
    return HeadPatterns(blocks, query_aware, n_vertical, n_slash, jsd)


def top_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool [H, N]: the top counts[h] entries of scores[h] (ties broken by index)."""
    k = int(counts.max().item())
    idx = torch.topk(scores, k, dim=-1).indices
    keep = torch.arange(k, device=scores.device)[None, :] < counts[:, None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, keep)
