"""Shared math for score-based KV eviction with native GQA storage.

Score-based eviction policies (LazyEviction, arXiv 2506.15969, and its H2O/TOVA-style relatives)
need three things that plain attention does not give them:

- the softmax probabilities of a few query rows (the decode step) over the whole cache, computed
  per KV-head group so that GQA keys are never copied to every query head;
- a selection rule "keep the `recent` newest tokens plus the best-scoring others", made per KV
  head (every head keeps the same count, so tensors stay rectangular);
- a per-head gather of cache tensors and of per-token state by those indices.

All functions work on one sequence (batch 1) and never touch module-level state.
"""

from __future__ import annotations

import math

import torch


def grouped_probs(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax probabilities, fp32, of decode rows that see every key: [1, Hq, R, D] x [1, Hkv, L, D]
    -> [Hq, R, L].

    Scores are computed per KV-head group (no repeated keys), in the model's dtype, and the softmax
    in fp32, the way transformers' eager attention does it.
    """
    _, hq, rows, dim = query.shape
    hkv, length = key.shape[1], key.shape[2]
    q = query[0].reshape(hkv, (hq // hkv) * rows, dim)
    scores = torch.matmul(q, key[0].transpose(-1, -2)).float() * scaling  # [Hkv, G*R, L]
    return torch.softmax(scores, dim=-1).view(hq, rows, length)


def grouped_activations(query: torch.Tensor, key: torch.Tensor, scaling: float, threshold: float) -> torch.Tensor:
    """Which keys each query row attends with probability >= `threshold`, key-major: bool [Hq, L, R].

    query [1, Hq, R, D] holds the last R tokens of key [1, Hkv, L, D] (causal, bottom-right). The
    test p >= a is made as score >= logsumexp + log(a), so the probabilities are never written out.
    """
    _, hq, rows, dim = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = hq // hkv
    q = query[0].view(hkv, groups, rows, dim)
    scores = torch.matmul(key[0][:, None], q.transpose(-1, -2)).float() * scaling  # [Hkv, G, L, R]
    future = torch.ones(rows, rows, dtype=torch.bool, device=key.device).tril(-1)  # key after the row
    scores[:, :, length - rows :].masked_fill_(future, float("-inf"))
    cutoff = torch.logsumexp(scores, dim=2, keepdim=True) + math.log(threshold)
    return (scores >= cutoff).view(hq, length, rows)


def grouped_output(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention output from probabilities: [Hq, R, L] x [1, Hkv, L, D] -> [1, R, Hq, D]."""
    hq, rows, length = probs.shape
    hkv, dim = value.shape[1], value.shape[3]
    groups = hq // hkv
    p = probs.to(value.dtype).view(hkv, groups * rows, length)
    out = torch.matmul(p, value[0]).view(hq, rows, dim)
    return out.transpose(0, 1).unsqueeze(0).contiguous()


def reduce_groups(per_query_head: torch.Tensor, num_kv_heads: int, how: str) -> torch.Tensor:
    """[Hq, L] -> [Hkv, L] by max or mean over the query heads sharing each KV head."""
    hq, length = per_query_head.shape
    grouped = per_query_head.view(num_kv_heads, hq // num_kv_heads, length)
    return grouped.amax(dim=1) if how == "max" else grouped.mean(dim=1)


def select_recent_and_top(score: torch.Tensor, keep: int, recent: int) -> torch.Tensor:
    """Indices [H, keep] (ascending, i.e. in cache order) of the `recent` last slots plus the
    `keep - recent` highest-scoring earlier slots, per head. Ties go to the older slot."""
    heads, length = score.shape
    recent = min(recent, keep)
    tail = torch.arange(length - recent, length, device=score.device).expand(heads, recent)
    extra = keep - recent
    if extra <= 0:
        return tail.clone()
    order = torch.sort(score[:, : length - recent], dim=-1, descending=True, stable=True).indices
    chosen = torch.cat([order[:, :extra], tail], dim=-1)
    return torch.sort(chosen, dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-head gather along the token axis: x [1, H, L, D] or [H, L]; index [H, K] (H may be a
    multiple of index's heads: query-head state follows its KV head's selection)."""
    heads = x.shape[-3] if x.dim() == 4 else x.shape[0]
    if heads != index.shape[0]:
        index = index.repeat_interleave(heads // index.shape[0], dim=0)
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    expanded = index[None, :, :, None].expand(x.shape[0], heads, index.shape[1], x.shape[-1])
    return torch.gather(x, 2, expanded)


def percentile_from_counts(counts: torch.Tensor, percentile: float) -> int | None:
    """Smallest value v with at least `percentile`% of the observations <= v, from a histogram
    `counts[v]` of non-negative integers; None when there are no observations."""
    total = int(counts.sum())
    if total == 0:
        return None
    cumulative = torch.cumsum(counts, dim=0)
    need = percentile / 100.0 * total
    return int(torch.searchsorted(cumulative.double(), torch.tensor([need], dtype=torch.float64)).item())
