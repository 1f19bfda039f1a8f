"""FlexPrefill: context-aware, per-head block-sparse attention for the prefill.

FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference,
Lai et al., ICLR 2025, https://arxiv.org/abs/2502.20766 (reference: bytedance/FlexPrefill,
`flex_prefill/ops/flex_prefill_attention.py`).

Algorithm, per query head, for every prefill forward of every layer (block size bs): the pattern
selection of `patterns.py` (1. probe: the last bs queries over all keys give the vertical and slash
distributions; 2. budgets: the fewest tokens covering `gamma` of each; 3. pattern test: a head whose
block-mean estimate lies within sqrt-JSD `tau` of the probe is query-aware, else vertical-slash;
4. cells: query-aware heads take the most probable cells of a block-level attention map,
vertical-slash heads the top key-block columns and block diagonals; key block 0 and the main
diagonal always), then 5. the union of cells is computed exactly by the shared block-sparse layer
(`kvmux.policies.sparse`, block grid form: its eager back-end on CPU, flex_attention on CUDA).
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
- Budget divisor (step 2) = configured block size; the reference code divides by a hard-coded 128
  whatever its block size.
- Slash mass is pooled by diagonal distance d -> block offset d // bs on the absolute block
  grid; the reference pools the reversed diagonal index from the left, which is misaligned by
  N mod bs positions when the length is not a block multiple.
- The Jensen-Shannon distance uses x*log(x/m) with 0*log 0 = 0, so an underflowed block
  probability cannot turn the distance into NaN (which silently made the head vertical-slash).
- Any Tq <= Tk (chunks, a cached prefix) is accepted; the reference asserts Tq == Tk. Batch > 1
  (or a padded mask) falls back to dense attention rather than failing. A forward of at most one
  query block after cached keys (a question after a prefix served by the prefix cache) runs dense:
  its pattern estimate would come from a partial block, and its dense cost is one block row.
- Runs in fp32 on CPU and bf16 on CUDA through the sparse layer's exact eager back-end or
  `torch.nn.attention.flex_attention`; the reference requires bf16 Triton kernels with head_dim
  and bs in {16, 32, 64, 128}.
- Density is reported as kept cells / causal cells (the reference reports kept / nb^2).
- Retrieval heads (`retrieval_heads` N, off by default; not in the paper): the N best heads of the
  model's retrieval-head profile (`kvmux.policies.retrieval_heads`) keep every causal cell of the
  prefill, as DuoAttention keeps its retrieval heads whole; the other heads select as above.
  `gate_heads` N (off by default) adds the N other heads of largest FlexPrefill gate gain in the
  profile (`kvmux calibrate --gates`, DuoAttention's head gate as one gradient step).

Measurements: docs/results/flexprefill.md.
"""

from __future__ import annotations

import math

import torch

from kvmux.policies.base import FP32_BYTES, AttentionCall, Policy, PolicySession, pass_bytes
from kvmux.policies.dense import dense_attention
from kvmux.policies.flexprefill.params import FlexPrefillParams
from kvmux.policies.flexprefill.patterns import select_blocks
from kvmux.policies.prefix import PrefixReuse
from kvmux.policies.registry import register
from kvmux.policies.retrieval_heads import dense_head_mask, heads_per_layer
from kvmux.policies.sparse.attention import block_sparse_attention
from kvmux.policies.sparse.grid import causal_blocks, normalize_blocks, num_blocks


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
        mask = dense_head_mask(self.info, self.params.retrieval_heads, self.params.gate_heads, "flexprefill")
        self.dense_heads = heads_per_layer(mask, self.info.num_layers)  # per layer: retrieval/gate heads kept dense

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
        if b > 1 or self.is_short(tk) or (tq <= self.params.block_size < tk):
            self.dense_calls += 1
            cells = int(causal_blocks(tq, tk, self.params.block_size).sum()) * hq * b
            self.kept_cells += cells
            self.causal_cells += cells
            return dense_attention(call)
        blocks = self.select(call)
        self.sparse_calls += 1
        self.kept_cells += int(blocks.sum())
        self.causal_cells += int(causal_blocks(tq, tk, self.params.block_size).sum()) * hq
        self.heads_seen += hq
        return self.sparse_attention(call, blocks)

    def select(self, call: AttentionCall) -> torch.Tensor:
        """The cells of one sparse prefill call: bool [1, Hq, nqb, nkb] on the absolute grid (diagonal added)."""
        hq, tq, tk = call.query.shape[1], call.query.shape[2], call.key.shape[2]
        sel = select_blocks(call.query[0], call.key[0], call.scaling, self.params)
        heads = self.dense_heads[call.layer_idx]
        if heads is not None:
            sel.blocks[heads] = True  # every causal cell (the rest are dropped below)
        self.query_aware_heads += int(sel.query_aware.sum())
        return normalize_blocks(sel.blocks[None], 1, hq, tq, tk, self.params.block_size)

    def sparse_attention(self, call: AttentionCall, blocks: torch.Tensor) -> torch.Tensor:
        """Exact attention over the selected cells, through the shared block-sparse layer."""
        p = self.params
        return block_sparse_attention(call.query, call.key, call.value, blocks, p.block_size, call.scaling, p.backend)

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

    def check_prompt(self, params, info, request, prompt_ids) -> None:
        dense_head_mask(info, params.retrieval_heads, params.gate_heads, self.name)  # the profile has what is asked

    def prefix_reuse(self, params, info, chunk: int) -> PrefixReuse:
        # every token's K/V is kept, but the sparse pattern of a forward is estimated from its last query
        # block: the prefix's K/V depended on the tokens after it in that forward (inexact reuse)
        return PrefixReuse(granularity=params.block_size, exact=False)

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
