"""HiP: hierarchically pruned attention (prefill and decode), the full KV cache kept.

A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with Hierarchically Pruned
Attention, Lee et al., ICLR 2025, https://arxiv.org/abs/2406.09827 (algorithm of the v1.1 kernel).

Algorithm: queries are tiled into blocks of `block_size_q` (b_q) and keys into blocks of
`block_size_k` (b_k). Per query block and query head, a branch-and-prune search (`search.py`)
estimates the top `mask_k / b_k` key blocks over the causal prefix minus the sinks and the
sliding window, scoring each branch by its center key block against every `block_stride_q`-th
query of the block, for about log2(T / k) rounds. Each query then attends, in one softmax, to
the `sink_tokens` first tokens, the selected key blocks and its last `window` tokens (causal;
a key in two of these sets counts once), so it sees at most `mask_k + sink_tokens + window` keys.
The first `dense_layers` layers, and every call whose keys fit that budget, run dense attention.
Decoding searches with the single query, keeps the selection per layer and re-searches every
`refresh_interval` steps; between refreshes the new tokens are covered by the window. On the
PyTorch path the selected tokens' keys and values are gathered once per refresh (`decode_keys.py`). Every
token stays in the KV cache: HiP saves attention compute, not memory.

The attention over the selection is the shared block-sparse layer's (`kvmux.policies.sparse`, its
key-block selection form: sinks + selected blocks + window in one softmax). Three implementations
with one meaning (`kernel`): `reference` and `fast` are the layer's PyTorch back-ends (one gather of
every attended key, or shared sink and window slices plus gathered blocks) after the PyTorch search
of `search.py`; `triton` runs the search (`triton_search.py`) and the attention (the layer's Triton
back-end) as two fused Triton kernels, one program per (head, query block), as the paper's v1.1
kernels do. `auto` (default) is `triton` for CUDA tensors when Triton is installed, else `fast`; a
Triton failure is logged and the `fast` path used from then on. Tests check every kernel against a
dense computation with the equivalent token mask (Triton through its CPU interpreter).

Deviations from the paper / reference code:
- The candidate range of a query block ends at `last query + 1 - window` rounded *up* to a whole
  block, and starts at block `floor(sinks / b_k)`; keys of those edge blocks that are also sinks
  or in a query's window count once. When every candidate is selected the result is exactly
  dense attention (the reference rounds the other way and may skip up to b_k - 1 tokens).
- Decode: at a refresh the candidate range extends `refresh_interval - 1` tokens into the
  window (masked until they leave the window), so tokens sliding out of the window between
  refreshes are never out of both the selection and the window; the interval is capped at
  `window` for the same reason (the reference lets such tokens drop out until the next refresh).
- The score of a key block is the max of q . k over the sampled queries and all b_k keys
  (b_sk = 1), in fp32; the scale is not applied (it does not change the ranking).
- `score_mode=table` (chosen by `auto` on CPU for candidate ranges up to 32K tokens, elsewhere
  on short ranges) scores all candidate blocks with one matmul instead of gathering
  representatives each round; it selects the same blocks. The Triton search needs K_b = k / b_k
  to be a power of two >= 16 (the default 256 is); other K_b search in PyTorch. flex_attention
  is not used: its block masks are too coarse for b_k = 2.
- `search=exact` (off by default; not the paper's method) replaces the branch-and-prune search by
  the exact top `k / b_k` key blocks under the same block score (`exact_search.py`): what the search
  approximates, at a scoring cost quadratic in the context. It keeps a needle that the search's
  center representatives miss when the keys around it all look alike (repeated filler).
  `exact_layers=N` (0 by default; not the paper's method) takes the exact top blocks in the
  layers below N only and the paper's search in the others.
- One request per session: a padding mask handed in by transformers is not applied on the sparse
  path (the causal structure is rebuilt from positions, aligned bottom-right).
- Retrieval heads (`retrieval_heads` N, off by default; not in the paper): the N best heads of the
  model's retrieval-head profile (`kvmux.policies.retrieval_heads`) attend densely in the sparse
  layers, prefill and decode, as DuoAttention keeps its retrieval heads whole. Their keys count as
  dense in `attention_density` (on the Triton path their sparse keys are counted too, a small
  overcount); `hip_max_keys_per_query` stays the sparse heads' bound. `gate_heads` N (off by
  default) makes N more heads dense: those of largest HiP gate gain in the profile, DuoAttention's
  head gate taken as one gradient on calibration prompts (`kvmux.evals.calibrate.gates`).
- Chunked prefill: query blocks are tiled from each forward's first query, so the prompt is
  prefilled in chunks of whole query blocks (the server's chunk rounded down to a multiple of
  `block_size_q`, at least one block): the blocks then fall where one pass over the prompt puts
  them, and a chunked prefill computes what one pass computes.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from types import ModuleType

import torch

from kvmux.policies.base import FP32_BYTES, AttentionCall, Policy, PolicyInputError, PolicySession
from kvmux.policies.dense import dense_attention
from kvmux.policies.hip.accounting import AttendedKeys, causal_keys
from kvmux.policies.hip.decode_keys import GatheredSelection, decode_attention, gather_selection
from kvmux.policies.hip.exact_search import exact_search
from kvmux.policies.hip.params import HipParams, Kernel, ResolvedKernel
from kvmux.policies.hip.search import choose_score_mode, hip_search, search_row
from kvmux.policies.prefix import PrefixReuse
from kvmux.policies.registry import register
from kvmux.policies.retrieval_heads import dense_head_mask, dense_heads_into, heads_per_layer, visible_keys
from kvmux.policies.sparse.attention import key_block_attention, triton_backend
from kvmux.policies.sparse.selection import KeyBlockSelection, SparseGeometry, last_query_candidates, slice_bytes

log = logging.getLogger(__name__)


class _TritonState:
    """Whether the Triton kernels still work in this process (cleared after a failure)."""

    def __init__(self) -> None:
        self.usable = True


@functools.cache
def _triton_state() -> _TritonState:
    return _TritonState()


@functools.cache
def triton_kernels() -> ModuleType | None:
    """HiP's Triton search kernel module, or None where Triton is not installed."""
    try:
        from kvmux.policies.hip import triton_search as kernels
    except ImportError:
        return None
    return kernels


def resolve_kernel(kernel: Kernel, device: torch.device) -> ResolvedKernel:
    """`auto`: Triton for CUDA tensors when it is installed and has not failed, else `fast`."""
    if kernel != "auto":
        return kernel
    if device.type == "cuda" and _triton_state().usable and triton_kernels() is not None:
        return "triton"
    return "fast"


@dataclass(slots=True)
class DecodeMask:
    """A layer's cached decode selection and the steps it has served."""

    selection: KeyBlockSelection
    steps: int = 0
    packed: tuple[torch.Tensor, torch.Tensor] | None = None  # the selection as the Triton attention reads it
    gathered: GatheredSelection | None = None  # its tokens' keys and values, for the PyTorch decode


class HipSession(PolicySession):
    params: HipParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decode_masks: dict[int, DecodeMask] = {}
        self.searches = 0  # (layer, forward) pairs that ran the branch-and-prune search
        self.mask_reuses = 0  # decode (layer, step) pairs that reused a cached selection
        self.keys = AttendedKeys()
        self.rounds = 0
        p = self.params
        mask = dense_head_mask(self.info, p.retrieval_heads, p.gate_heads, "hip")
        self.dense_heads = heads_per_layer(mask, self.info.num_layers)  # per layer: retrieval (and gate) heads

    def prefill_chunk_tokens(self, runner) -> int:
        """The runner's chunk rounded down to whole query blocks (at least one): query blocks are tiled
        from each forward's first query, so only then is a chunked prefill the one-pass computation."""
        block = self.params.block_size_q
        return max(block, runner.prefill_chunk_tokens // block * block)

    # -- geometry ---------------------------------------------------------------------------
    def _geometry(self, call: AttentionCall, block_q: int, lookahead: int) -> SparseGeometry:
        p = self.params
        return SparseGeometry.build(
            num_queries=call.query.shape[2],
            num_keys=call.key.shape[2],
            block_q=block_q,
            block_k=p.block_size_k,
            sinks=p.sink_tokens,
            window=p.window,
            lookahead=lookahead,
            device=call.query.device,
        )

    def _exact(self, call: AttentionCall) -> bool:
        """Whether the layer takes the exact top blocks (`search=exact`, or below `exact_layers`)."""
        return self.params.search == "exact" or call.layer_idx < self.params.exact_layers

    def select(
        self, call: AttentionCall, geo: SparseGeometry, block_stride: int, kernel: ResolvedKernel = "fast"
    ) -> KeyBlockSelection:
        """Key blocks for every query block of the call: the search, or the exact top blocks (`kernel` as resolved)."""
        p = self.params
        groups = p.mask_k // p.block_size_k
        sel = None
        if self._exact(call):
            sel = exact_search(
                geo.query_blocks(call.query), call.key, geo.lo, geo.hi, groups, p.block_size_k, block_stride
            )
        elif kernel == "triton" and triton_kernels().usable_groups(groups):
            sel = self._try_triton(lambda: triton_kernels().search(call.query, call.key, geo, groups, block_stride))
        if sel is None:
            sel = hip_search(
                geo.query_blocks(call.query),
                call.key,
                geo.lo,
                geo.hi,
                num_groups=groups,
                block_k=p.block_size_k,
                query_stride=block_stride,
                score_mode=p.score_mode,
            )
        self.searches += 1
        self.rounds = max(self.rounds, sel.rounds)
        return sel

    def _kernel(self, call: AttentionCall) -> ResolvedKernel:
        kernel = resolve_kernel(self.params.kernel, call.query.device)
        if kernel == "triton" and triton_kernels() is None:
            raise PolicyInputError("hip kernel 'triton' needs the triton package; use kernel 'auto' or 'fast'")
        return kernel

    def _try_triton(self, run):
        """Run a Triton kernel; under `auto`, a failure is logged and answered with None (PyTorch path)."""
        if not _triton_state().usable and self.params.kernel == "auto":
            return None
        try:
            return run()
        except Exception as err:  # compile or launch failure of a Triton kernel
            if self.params.kernel == "triton":
                raise
            _triton_state().usable = False
            log.warning("HiP Triton kernels unusable (%s); using the PyTorch kernels", err)
            return None

    # -- attention --------------------------------------------------------------------------
    def attention(self, call: AttentionCall) -> torch.Tensor:
        p = self.params
        tq, tk = call.query.shape[2], call.key.shape[2]
        if tq > 1:
            self.decode_masks.pop(call.layer_idx, None)  # new prompt tokens: the decode mask is stale
        if call.layer_idx < p.dense_layers or tk <= p.budget:
            self.keys.add_dense_call(call)
            return dense_attention(call)
        kernel = self._kernel(call)
        self.keys.causal_sum += causal_keys(call)
        geo = None
        if call.is_decode and kernel == "fast":
            out, counts = self._decode_fast(call)
            return self._finish_sparse(out, counts, call)
        if call.is_decode:
            block_q, mask = 1, self._decode_mask(call, kernel)
            sel = mask.selection
        else:
            block_q, mask = p.block_size_q, None
            geo = self._geometry(call, block_q, lookahead=0)
            sel = self.select(call, geo, min(p.block_stride_q, p.block_size_q), kernel)
        heads = self.dense_heads[call.layer_idx]
        if kernel == "triton":
            out = self._try_triton(lambda: self._triton_attention(call, sel, mask, block_q))
            if out is not None:
                return self._with_dense_heads(out, call, heads)
            kernel = "fast"
        geo = geo or self._geometry(call, block_q, lookahead=0)
        out, counts = key_block_attention(call.query, call.key, call.value, sel, geo, call.scaling, kernel)
        return self._finish_sparse(out, counts, call)

    def _decode_fast(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode row on the PyTorch path: the refresh's selected keys are gathered once (`decode_keys.py`)."""
        p = self.params
        mask = self._decode_mask(call, "fast")
        if mask.gathered is None:
            mask.gathered = gather_selection(mask.selection, call.key, call.value, p.block_size_k, p.sink_tokens)
        return decode_attention(call.query, call.key, call.value, mask.gathered, p.window, call.scaling)

    def _finish_sparse(self, out: torch.Tensor, counts: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """Count a sparse call's keys per row and put the layer's retrieval heads (if any) back dense."""
        heads = self.dense_heads[call.layer_idx]
        if heads is not None:
            counts = counts.index_fill(1, heads, 0)  # counted as dense below
        self.keys.add_sparse_counts(counts)
        return self._with_dense_heads(out, call, heads)

    def _with_dense_heads(self, out: torch.Tensor, call: AttentionCall, heads: torch.Tensor | None) -> torch.Tensor:
        """The layer's retrieval heads (if any) replaced by their dense attention."""
        if heads is not None:
            dense_heads_into(out, call, heads)
            self.keys.dense_sum += visible_keys(call, heads.numel())
        return out

    def _triton_attention(self, call: AttentionCall, sel: KeyBlockSelection, mask: DecodeMask | None, block_q: int):
        """The Triton kernel from scalars: no geometry tensors, no per-call conversions between refreshes."""
        p, kernels = self.params, triton_backend()
        if mask is None:
            packed = kernels.pack(sel)
        else:  # decode: packed once per refresh
            mask.packed = packed = mask.packed or kernels.pack(sel)
        out, _ = kernels.attention(
            call.query, call.key, call.value, packed,
            block_q=block_q, block_k=p.block_size_k, sinks=p.sink_tokens, window=p.window,
            scaling=call.scaling, totals=self.keys.totals_on(call.query.device),
        )  # fmt: skip
        return out

    def _decode_mask(self, call: AttentionCall, kernel: ResolvedKernel) -> DecodeMask:
        """The layer's decode selection: searched at a refresh (every `refresh_interval` steps), else reused."""
        p = self.params
        cached = self.decode_masks.get(call.layer_idx)
        if (
            cached is None
            or cached.steps >= p.effective_refresh
            or cached.selection.blocks.shape[0] != call.query.shape[0]
        ):
            cached = DecodeMask(self._search_decode(call, kernel))
            self.decode_masks[call.layer_idx] = cached
        else:
            self.mask_reuses += 1
        cached.steps += 1
        return cached

    def _search_decode(self, call: AttentionCall, kernel: ResolvedKernel) -> KeyBlockSelection:
        """A refresh's search, with look-ahead for the steps that reuse it: the candidate range computed on
        the host and `search_row` when the PyTorch kernel scores a table; else the general search."""
        p = self.params
        lookahead = p.effective_refresh - 1
        groups = p.mask_k // p.block_size_k
        lo, hi = last_query_candidates(call.key.shape[2], p.block_size_k, p.sink_tokens, p.window, lookahead)
        mode = choose_score_mode(p.score_mode, hi - lo, groups, call.key.device.type)
        if kernel != "fast" or mode != "table" or self._exact(call):
            return self.select(call, self._geometry(call, 1, lookahead=lookahead), 1, kernel)
        sel = search_row(call.query, call.key, lo, hi, groups, p.block_size_k)
        self.searches += 1
        self.rounds = max(self.rounds, sel.rounds)
        return sel

    def stats(self):
        stats = super().stats()
        stats.attention_density = self.keys.density()
        stats.extra.update(
            {
                "hip_budget_per_query": self.params.budget,
                "hip_max_keys_per_query": self.keys.max_per_row,
                "hip_searches": self.searches,
                "hip_mask_reuses": self.mask_reuses,
                "hip_rounds": self.rounds,
            }
        )
        return stats

    def close(self) -> None:
        self.decode_masks.clear()
        super().close()


@register
class HipPolicy(Policy):
    name = "hip"
    paper = "2406.09827"
    Params = HipParams
    session_class = HipSession
    summary = "hierarchically pruned top-k key blocks + sinks + window (compute only; full KV kept)"

    def check_prompt(self, params, info, request, prompt_ids) -> None:
        dense_head_mask(info, params.retrieval_heads, params.gate_heads, self.name)  # the profile has what is asked

    def prefix_reuse(self, params, info, chunk: int) -> PrefixReuse:
        # a query block's selection reads its own queries and the keys before them: the state after a
        # whole number of query blocks (prefill chunks are whole blocks) is a function of that prefix
        return PrefixReuse(granularity=params.block_size_q)

    def step_bytes_needed(self, params, info, num_tokens: int, chunk: int, query_tokens: int = 0) -> int:
        # dense layers and short calls; the search and the sparse attention run in slices of query
        # blocks sized by `slice_bytes` (at least one block each, at most the chunk's blocks), plus the
        # per-offset key copies
        hq, hkv, d = info.num_heads, info.num_kv_heads, info.head_dim
        device = info.device.type
        bq, bk = params.block_size_q, params.block_size_k
        sampled = max(1, bq // min(params.block_stride_q, bq))
        groups = params.mask_k // bk
        one_search = max(8 * hq * sampled * max(num_tokens // bk, 1), 4 * hq * 2 * groups * bk * (d + sampled))
        width = params.window + bq - 1
        one_slice = hq * (params.mask_k + width + params.sink_tokens) * (2 * d + 3 * bq) * FP32_BYTES
        chunk = max(bq, chunk // bq * bq)  # the session's prefill chunk: whole query blocks
        blocks = math.ceil(min(chunk, num_tokens) / bq)  # query blocks of one prefill chunk
        search = min(blocks * one_search, max(slice_bytes(device), one_search))
        attention = min(blocks * one_slice, max(slice_bytes(device), one_slice))
        copies = hkv * num_tokens * d * FP32_BYTES + 2 * hq * min(chunk, num_tokens) * d * FP32_BYTES
        return super().step_bytes_needed(params, info, num_tokens, chunk) + search + attention + copies
