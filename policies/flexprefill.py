"""FlexPrefill: context-aware, per-head block-sparse attention for the prefill.

FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference,
Lai et al., ICLR 2025, https://arxiv.org/abs/2502.20766 (reference: bytedance/FlexPrefill,
`flex_prefill/ops/flex_prefill_attention.py`).

Algorithm, per query head, for every prefill forward of every layer (block size bs):
1. Probe: the last bs queries attend (exactly, causally) to all keys. Their mean attention per
   key is the *vertical* distribution; their attention summed along each diagonal (distance
   query - key) and divided by the number of probe rows is the *slash* distribution.
2. Budgets: the fewest tokens whose sorted probe mass reaches `gamma`, computed separately for
   vertical and slash, converted to blocks as `tokens // block_size + 1` and clamped to
   [ceil(min_budget / bs), ceil(max_budget / bs)]. The divisor is the configured block size; the
   reference code divides by a hard-coded 128 whatever its block size.
3. Pattern test: the mean probe query against block-mean keys gives an estimated block
   distribution; its square-root Jensen-Shannon distance to the probe's true block distribution
   (the vertical mass pooled per key block) is compared with `tau`. Below `tau` the cheap
   estimate is trusted and the head is *query-aware*: its vertical and slash budgets drop to the
   minimum and it adds the cells of a block-level attention map (block-mean queries x block-mean
   keys, row softmax over causal blocks), taken in descending order while their cumulative
   mass stays within gamma x (number of query blocks). Otherwise the head is *vertical-slash*.
4. Vertical-slash cells: the top key blocks by vertical mass (whole columns) and the top block
   diagonals by slash mass. Key block 0 and the main diagonal are always kept.
5. The union of cells is computed exactly by the shared block-sparse helper (`sparse.py`).
Decoding is dense over the full cache (the paper sparsifies the prefill only); prompts with
at most max(2, ceil(min_budget/bs)) key blocks are prefilled densely, as in the reference.

Chunked prefill: by default (`prefill_chunk=0`) a prompt of up to `max_single_pass_tokens`
(8192) tokens is prefilled in ONE forward, as the paper does, so the probe is the prompt's real
last block (where the question usually sits). Why one pass: the paper estimates every head's
pattern (vertical-slash budgets, the query-aware test) from the last query block of the whole
prompt; chunking gives each chunk its own probe, which changes the selections. With
`prefill_chunk > 0` the prompt is prefilled in chunks and every chunk runs the same selection with
its own last block as the probe over all keys so far (blocks on the absolute grid, rows = the
chunk's query blocks): correct attention, but a chunk's probe does not see the question at the end
of the prompt, so the pattern may differ from the one-pass result.

The single pass is capped (a deviation, for serving): one forward cannot be interleaved with other
requests, and its activations, mask and block map grow with the prompt. A prompt longer than
`max_single_pass_tokens` (at most 131072) is prefilled in forwards of that size aligned to the
prompt's END (the first forward takes the remainder): the last forward's probe is still the
prompt's real last block over all keys, so the rows of the last `max_single_pass_tokens` queries
get the one-pass vertical-slash budgets and query-aware test; earlier rows get their own forward's
probe, as with `prefill_chunk`. Raise `max_single_pass_tokens` (per preset or request) to keep the
paper's single pass for longer prompts; the server counts that pass's memory before admitting it.

Deviations from the reference code:
- Budget divisor = configured block size (see 2), not 128.
- Slash mass is pooled by diagonal distance d -> block offset d // bs on the absolute block
  grid; the reference pools the reversed diagonal index from the left, which is misaligned by
  N mod bs positions when the length is not a block multiple.
- The Jensen-Shannon distance uses x*log(x/m) with 0*log 0 = 0, so an underflowed block
  probability cannot turn the distance into NaN (which silently made the head vertical-slash).
- Any Tq <= Tk (chunks, a cached prefix) is accepted; the reference asserts Tq == Tk. Batch > 1
  (or a padded mask) falls back to dense attention rather than failing.
- Runs in fp32 on CPU and bf16 on CUDA through `torch.nn.attention.flex_attention` or the exact
  gather reference; the reference requires bf16 Triton kernels with head_dim and bs in
  {16, 32, 64, 128}.
- Density is reported as kept cells / causal cells (the reference reports kept / nb^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from kvmux.policies.base import FP32_BYTES, AttentionCall, Policy, PolicyParams, PolicySession, pass_bytes
from kvmux.policies.dense import dense_attention
from kvmux.policies.registry import register
from kvmux.policies.sparse import (
    block_sparse_attention,
    causal_blocks,
    first_query_block,
    normalize_blocks,
    num_blocks,
    query_blocks,
)

# longest forward FlexPrefill may run (a whole-prompt pass or an explicit chunk)
MAX_PASS_TOKENS = 131072


class FlexPrefillParams(PolicyParams):
    block_size: int = Field(128, ge=16, le=512, description="tokens per query/key block (paper: 128; at most 512)")
    gamma: float = Field(0.95, gt=0.0, le=1.0, description="attention mass each head must cover (paper: 0.9-0.95)")
    tau: float = Field(0.1, ge=0.0, le=1.0, description="sqrt-JSD threshold below which a head is query-aware")
    min_budget: int = Field(
        1024, ge=0, le=1 << 20, description="minimum vertical and slash budget, tokens (at most 1048576)"
    )
    max_budget: int | None = Field(
        None, ge=1, le=1 << 22, description="maximum vertical and slash budget, tokens (None = all; at most 4194304)"
    )
    prefill_chunk: int = Field(
        0,
        ge=0,
        le=MAX_PASS_TOKENS,
        description=f"0: one forward up to max_single_pass_tokens (paper); >0: chunk size (at most {MAX_PASS_TOKENS})",
    )
    max_single_pass_tokens: int = Field(
        8192,
        ge=128,
        le=MAX_PASS_TOKENS,
        description="with prefill_chunk 0: longest prompt prefilled in one forward; longer prompts are prefilled "
        f"in forwards of this many tokens, the last one ending at the prompt's end (at most {MAX_PASS_TOKENS})",
    )
    backend: Literal["auto", "eager", "flex"] = Field("auto", description="block-sparse back-end (see sparse.py)")


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


class FlexPrefillSession(PolicySession):
    params: FlexPrefillParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept_cells = 0  # selected causal cells, summed over sparse calls, layers and heads
        self.causal_cells = 0  # all causal cells of the same calls (dense calls count as fully kept)
        self.sparse_calls = 0
        self.dense_calls = 0
        self.query_aware_heads = 0
        self.heads_seen = 0
        self.prefill_forwards = 0

    def prefill_chunk_tokens(self, runner) -> int:
        return self.params.prefill_chunk or self.params.max_single_pass_tokens

    def prefill(self, runner, input_ids: torch.Tensor):
        """One forward (the paper) up to `max_single_pass_tokens`; longer prompts in forwards of that size
        aligned to the prompt's end, so the last forward's probe is the prompt's real last block."""
        p, total = self.params, input_ids.shape[1]
        cap = self.prefill_chunk_tokens(runner)
        if p.prefill_chunk or total <= cap:
            self.prefill_forwards = math.ceil(total / cap)
            return (yield from super().prefill(runner, input_ids))
        bounds = [0, *range(total % cap or cap, total + 1, cap)]
        self.prefill_forwards = len(bounds) - 1
        logits = None
        for start, stop in zip(bounds, bounds[1:], strict=False):
            logits = runner.forward(self, input_ids[:, start:stop])
            yield
        return logits[0, -1]

    def is_short(self, num_keys: int) -> bool:
        bs = self.params.block_size
        return num_blocks(num_keys, bs) <= max(2, math.ceil(self.params.min_budget / bs))

    def attention(self, call: AttentionCall) -> torch.Tensor:
        b, hq, tq, _ = call.query.shape
        tk = call.key.shape[2]
        if call.is_decode:
            return dense_attention(call)
        if b > 1 or self.is_short(tk):
            self.dense_calls += 1
            cells = int(causal_blocks(tq, tk, self.params.block_size).sum()) * hq * b
            self.kept_cells += cells
            self.causal_cells += cells
            return dense_attention(call)
        sel = select_blocks(call.query[0], call.key[0], call.scaling, self.params)
        blocks = normalize_blocks(sel.blocks[None], 1, hq, tq, tk, self.params.block_size)
        self.sparse_calls += 1
        self.kept_cells += int(blocks.sum())
        self.causal_cells += int(causal_blocks(tq, tk, self.params.block_size).sum()) * hq
        self.query_aware_heads += int(sel.query_aware.sum())
        self.heads_seen += hq
        return block_sparse_attention(
            call.query, call.key, call.value, blocks, self.params.block_size, call.scaling, self.params.backend
        )

    def stats(self):
        stats = super().stats()
        stats.attention_density = self.kept_cells / self.causal_cells if self.causal_cells else 1.0
        stats.extra["sparse_calls"] = self.sparse_calls
        stats.extra["dense_calls"] = self.dense_calls
        if self.prefill_forwards:
            stats.extra["prefill_forwards"] = self.prefill_forwards
        if self.heads_seen:
            stats.extra["query_aware_fraction"] = round(self.query_aware_heads / self.heads_seen, 4)
        return stats


@register
class FlexPrefillPolicy(Policy):
    name = "flexprefill"
    paper = "2502.20766"
    Params = FlexPrefillParams
    session_class = FlexPrefillSession
    summary = "per-head adaptive block-sparse prefill (vertical-slash / query-aware), dense decode"

    def step_bytes_needed(self, params, info, num_tokens: int, chunk: int, query_tokens: int = 0) -> int:
        hq, hkv, d = info.num_heads, info.num_kv_heads, info.head_dim
        cap = params.prefill_chunk or params.max_single_pass_tokens
        tq, tk, bs = min(cap, num_tokens), num_tokens, params.block_size
        nqb, nkb = num_blocks(tq, bs) + 1, num_blocks(tk, bs)
        forward = pass_bytes(info, tq, chunk) + tq * tk  # activations of a long pass; the boolean mask
        probe = 2 * (hq // hkv) * min(bs, tq) * tk * FP32_BYTES + 4 * hq * tk * FP32_BYTES  # + vertical, slash
        cells = hq * nqb * nkb * 30  # block map: probabilities, sort, order, cumsum, masks
        copies = 4 * hq * tq * d * FP32_BYTES + 2 * hkv * tk * d * FP32_BYTES  # sorted queries, output; K/V blocks
        return forward + probe + cells + copies
