"""ActQKV: activation-aware probe-query KV retrieval with a dynamic per-layer cut-off.

Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs Inference,
Xiao et al., 2025, https://arxiv.org/abs/2502.13542 (reference: MrXiaoaa/ActQKV,
`context_manager_activate_3_dev.py`, an InfLLM / Q-LLM fork; InfLLM is arXiv 2402.04617).

Algorithm (per layer, per request; the memory layout is in `context_memory.py`):
1. Queries are processed in windows of `window` tokens (a decoded token is a window of one).
2. Local attention: each query sees the `n_local` most recent tokens (itself included).
3. Probe-query: the window's queries, flattened over heads, are weighted by their Activation
   Bias, mean_c (q_c - mu_c)^2 / (var_c + mean(var)/100), against running per-channel
   statistics of this request's windows; the probe is the weighted mean query.
4. Retrieval: cosine between the probe and every block representative (plus `question_weight`
   times the cosine with the question vector while reading the prompt, when `kv_policy.query`
   is given). One selection per layer, shared by all heads.
5. Dynamic cut-off: a pool of `topk * layers` blocks per window is shared by the layers in order.
   Layer l takes K_l = clip(round(w_l * pool_left), min(N, min_blocks), min(N, 2*topk)) where
   w_l = 1/(L-l) (equal split) or, while decoding once every layer has `entropy_history` samples,
   w_l = H_l / sum_{m>=l} H_m with H the mean normalised entropy of softmax(block scores) of each
   layer's last samples: layers whose relevance is spread out get more blocks.
6. Global attention over init tokens, the retrieved blocks and the recent tokens older than the
   query's local window; merged with the local part in one softmax (the log-sum-exp merge).
7. Tokens leaving the local window fill `init`, then blocks; a block's representative is, per
   head, the mean of its `repr_topk` keys that received the most local attention.

Positions (`positions`). The model runs every token at position 0, so q and k reach the attention
call un-rotated (times RoPE's attention scaling, which both carry), and keys are stored that way.
- `inf_llm` (default, the paper's scheme): local attention rotates the local keys to their slots
  0..L-1 and the queries to the last slots, so local distances are exact; every global key stays
  at position 0 and the window's queries are rotated by one angle, `n_local`, so every init,
  retrieved or remainder token looks `n_local` away. No distance ever exceeds
  `n_local + window`, so prompts far longer than the model's trained context work.
- `ordered` (a deviation; presets `actqkv_ordered`, and `actqkv_long` with a ~1K budget): the
  keys a window attends are laid out in their original order at consecutive slots - init tokens
  from 0, then the retrieved blocks, then the recent tokens - and the queries take their slots
  among the recent tokens, as StreamingLLM assigns positions inside its cache. The gaps left by
  blocks that were not retrieved close up, so distances stay below n_init + 2*topk*block_size +
  n_local + window (~3.8K with the defaults) whatever the prompt length, and the model still sees
  which retrieved token came first. Why: under `inf_llm` the retrieved blocks reach the model as
  an unordered set, and beyond its context the small embedded model then often continues the
  filler although the needle's block was retrieved (scripts/diagnose_actqkv.py). Neither ordered
  positions at the paper's budget nor InfLLM positions with 16 blocks per layer fix that; both
  together (`actqkv_long`) do. Measurements: docs/results/actqkv.md ("Ordered positions and a
  smaller budget") and docs/results/eval_long.
- `absolute`: every key and query is rotated to its absolute position (the dossier's simplified
  variant). Exact full attention when everything is retrieved; limited to the model's context.
Retrieval uses the `n_local`-rotated queries against the un-rotated representatives in all three.

Deviations from the reference, and why:
- State is per request: the Activation-Bias statistics are per request and per layer (the
  reference keeps one global set shared by all layers and all requests, so results depended on
  request order); the warm-up is `stats_warmup` windows per layer instead of 1000 calls
  overall, and the unit count is capped at `stats_horizon` (1000, as the reference). The
  statistics are folded with an equal-weight-per-window mean/variance merge (the reference's
  formula mixes unbiased and biased terms).
- The question vector comes from `kv_policy.query`: the question is run alone (positions 0..n-1)
  before the prompt and, per layer and head, the `repr_topk` question queries that received the
  most attention are averaged (the reference string-matches a dataset-specific question inside
  the prompt and uses in-context queries). As in the reference it only applies while the prompt
  is read (forwards of more than one token), not while decoding. The question's attention over
  itself is computed in pieces of query rows, each against the keys up to its last row (at most
  `QUESTION_PIECE_ELEMENTS` fp32 scores per piece), and the attention each key received is summed
  over the pieces: the same result up to float rounding, in O(piece x n) memory instead of three
  n x n copies per head. The server caps the question at `max_query_tokens` (1024 by default).
- Serving caps (the reference has none): window <= 512, n_local <= 4096, n_init <= 1024,
  block_size <= 256, topk and min_blocks <= 1024, and at most `MAX_ATTENDED_KEYS` (16384) keys per
  query (n_init + max(2*topk, min_blocks)*block_size + n_local + window), so one window's scores
  (window x keys per head, fp32) stay bounded. Every shipped preset is well inside them.
- "Prompt phase" means forwards of more than one token, "decoding" single-token forwards (the
  reference switches after its first 32K-token forward). The equal split applies to the prompt,
  the entropy split to decoding, as in the reference for prompts up to 32K.
- A layer with fewer than 2 blocks takes them all without recording an entropy sample or
  drawing from the pool (the reference records a 0 sample when it has no block).
- Each query sees its exact local window and, globally, only remainder tokens older than it;
  the reference's offset makes one token per window visible in both parts.
- No on-device LRU block cache: blocks live on the compute device, or on CPU with `offload`
  (the chosen blocks are copied per step). Block-hit LRU scores are therefore not kept.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

import torch
from pydantic import Field, model_validator
from transformers.cache_utils import Cache

from kvmux.policies.actqkv.context_memory import ActivationStats, ContextMemory, top_attended_mean
from kvmux.policies.base import (
    FP32_BYTES,
    AttentionCall,
    KVStats,
    Policy,
    PolicyInputError,
    PolicyParams,
    PolicySession,
    pass_bytes,
)
from kvmux.policies.registry import register
from kvmux.policies.rope import rotate

# most keys one window's queries may attend (bounds one step's scores: window x keys x heads)
MAX_ATTENDED_KEYS = 16384
# fp32 score elements of one piece of question rows (x3 copies: logits, masked, softmax): 16 MB each
QUESTION_PIECE_ELEMENTS = 1 << 22


class ActQKVParams(PolicyParams):
    n_init: int = Field(64, ge=0, le=1024, description="initial tokens always attended (paper: 64; at most 1024)")
    n_local: int = Field(512, ge=1, le=4096, description="local window of recent tokens (paper: 512; at most 4096)")
    block_size: int = Field(32, ge=1, le=256, description="tokens per retrievable block (paper: 32; at most 256)")
    repr_topk: int = Field(
        4, ge=1, le=256, description="most-attended keys averaged into a block representative (at most 256)"
    )
    topk: int = Field(
        46, ge=1, le=1024, description="mean blocks per layer: pool topk*layers, cap 2*topk (46; at most 1024)"
    )
    min_blocks: int = Field(
        32, ge=0, le=1024, description="per-layer floor of retrieved blocks (reference: 32; at most 1024)"
    )
    window: int = Field(
        256, ge=1, le=512, description="queries per retrieval window while reading (paper: 256; at most 512)"
    )
    question_weight: float = Field(4.0, ge=0.0, le=100.0, description="weight of the kv_policy.query term (4)")
    entropy_history: int = Field(
        100, ge=1, le=100_000, description="entropy samples per layer for the split (100; at most 100000)"
    )
    stats_warmup: int = Field(
        2, ge=0, le=100_000, description="windows per layer with uniform probe weights (at most 100000)"
    )
    stats_horizon: int = Field(
        1000, ge=1, le=1_000_000, description="cap on windows in the running statistics (at most 1000000)"
    )
    positions: Literal["inf_llm", "ordered", "absolute"] = Field(
        "inf_llm",
        description="'inf_llm': local relative, global at n_local (paper); 'ordered': attended keys at "
        "consecutive slots in their order; 'absolute': true positions",
    )
    offload: bool = Field(False, description="keep blocks in CPU memory, copy the chosen ones per step")

    @model_validator(mode="after")
    def _window_fits(self):
        if self.window > self.n_local:
            raise ValueError(f"window ({self.window}) must not exceed n_local ({self.n_local})")
        if self.attended_keys > MAX_ATTENDED_KEYS:
            raise ValueError(
                f"n_init + max(2*topk, min_blocks)*block_size + n_local + window is {self.attended_keys}; at most "
                f"{MAX_ATTENDED_KEYS} keys per query (one window's scores are window x that many per head)"
            )
        return self

    @property
    def attended_keys(self) -> int:
        """Most keys one query of a window attends: init + retrieved blocks + local window + window remainder."""
        return self.n_init + max(2 * self.topk, self.min_blocks) * self.block_size + self.n_local + self.window


class BlockBudget:
    """The per-window pool of `topk * layers` blocks shared by the layers in order (entropy-driven)."""

    def __init__(self, num_layers: int, topk: int, min_blocks: int, history: int):
        self.num_layers, self.topk, self.min_blocks = num_layers, topk, min_blocks
        self.pool_size = float(topk * num_layers)
        self.cap = 2 * topk
        self.history: list[deque[float]] = [deque(maxlen=history) for _ in range(num_layers)]
        self.pools: list[float] = []
        self.last: list[int] = [0] * num_layers

    def start_forward(self, num_windows: int) -> None:
        self.pools = [self.pool_size] * num_windows

    def weight(self, layer: int, entropy_split: bool) -> float:
        full = all(len(h) == h.maxlen for h in self.history)
        if entropy_split and full:
            means = [sum(h) / len(h) for h in self.history]
            rest = sum(means[layer:])
            if rest > 0:
                return means[layer] / rest
        return 1.0 / (self.num_layers - layer)

    def take(self, layer: int, window_idx: int, scores: torch.Tensor, entropy_split: bool) -> int:
        """Blocks for `layer` in window `window_idx` given its block scores [N]."""
        n = scores.shape[0]
        if n < 2:
            self.last[layer] = n
            return n
        p = torch.softmax(scores.float(), dim=0)
        entropy = -(p * torch.log(p + 1e-10)).sum().item() / math.log(n)
        self.history[layer].append(entropy)
        left = self.pools[window_idx]
        k = round(self.weight(layer, entropy_split) * left)
        k = max(min(k, min(n, self.cap)), min(n, self.min_blocks))
        self.pools[window_idx] = left - k
        self.last[layer] = k
        return k


class ActQKVSession(PolicySession):
    params: ActQKVParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.params
        self.budget = BlockBudget(self.info.num_layers, p.topk, p.min_blocks, p.entropy_history)
        self.inv_freq = self.info.inv_freq.to(self.info.device)
        self.capturing = False
        num_layers = self.info.num_layers
        self.attended = [0] * num_layers  # (query, key) pairs computed, per layer
        self.queries = [0] * num_layers
        self.max_attended = 0  # most keys any one query attended

    def make_cache(self) -> Cache:
        p = self.params
        layers = [
            ContextMemory(
                p.n_init,
                p.n_local,
                p.block_size,
                p.repr_topk,
                self.info.num_heads,
                ActivationStats(p.stats_warmup, p.stats_horizon),
                offload=p.offload,
            )
            for _ in range(self.info.num_layers)
        ]
        return Cache(layers=layers)

    def next_position_ids(self, num_tokens: int) -> torch.Tensor:
        # position 0 everywhere: q and k arrive un-rotated and are rotated here (see module docstring)
        return torch.zeros((1, num_tokens), dtype=torch.long, device=self.info.device)

    def prefill_chunk_tokens(self, runner) -> int:
        w = self.params.window
        return max(w, runner.prefill_chunk_tokens // w * w)

    # -- question vector ------------------------------------------------------------------------
    def prefill(self, runner, input_ids):
        text = self.request.query_text
        if text and self.params.question_weight > 0:
            ids = self.request.query_ids  # tokenized (and its length checked) when the request was prepared
            if ids is None:
                tokenizer = self.info.tokenizer
                if tokenizer is None:
                    raise PolicyInputError(
                        "actqkv: kv_policy.query needs the model's tokenizer", param="kv_policy.query"
                    )
                ids = tokenizer.encode(text, add_special_tokens=False)
            if ids:
                self.encode_question(runner, torch.tensor([ids], device=self.info.device))
                yield
        return (yield from super().prefill(runner, input_ids))

    def encode_question(self, runner, question_ids: torch.Tensor) -> None:
        """Run the question alone and store each layer's question vector; nothing enters the memory."""
        self.capturing, self.counts_tokens = True, False  # the question is not part of the request's tokens
        try:
            runner.forward(self, question_ids)
        finally:
            self.capturing, self.counts_tokens = False, True

    def _question_attention(
        self, mem: ContextMemory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling, piece_rows: int = 0
    ):
        """Causal attention of the question over itself, in pieces of query rows; stores the question vector.

        A piece of p rows scores its queries against the keys up to its last row, so the transient memory
        is O(p x n) fp32 scores (p = QUESTION_PIECE_ELEMENTS // (Hq x n) unless `piece_rows` is given)
        instead of three n x n copies per head: the attention each key received is summed piece by piece.
        """
        hq, n = q.shape[0], q.shape[1]
        dev = q.device
        pos = torch.arange(n, device=dev)
        q_rot, k_rot = rotate(q, pos, self.inv_freq), rotate(k, pos, self.inv_freq)
        rows = piece_rows or max(1, QUESTION_PIECE_ELEMENTS // (hq * n))
        received = torch.zeros(hq, n, device=dev)  # attention each question key received, per query head
        outs = []
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            causal = torch.arange(stop, device=dev)[None, :] <= torch.arange(start, stop, device=dev)[:, None]
            probs = self._probs(q_rot[:, start:stop], k_rot[:, :stop], scaling, causal)  # [Hkv, g, p, stop]
            received[:, :stop] += probs.sum(dim=2).reshape(hq, stop)
            outs.append(self._weighted(probs, v[:, :stop]))
            del probs
        probe_q = rotate(q, torch.full((n,), self.params.n_local, device=dev), self.inv_freq)
        mem.question = top_attended_mean(probe_q, received, self.params.repr_topk).reshape(-1)
        return torch.cat(outs, dim=1)

    # -- attention ------------------------------------------------------------------------------
    def attention(self, call: AttentionCall) -> torch.Tensor:
        if call.query.shape[0] != 1:
            raise PolicyInputError("actqkv serves one sequence per forward (batch size 1)")
        q, k, v = call.query[0], call.key[0], call.value[0]
        mem = self.cache.layers[call.layer_idx]
        assert isinstance(mem, ContextMemory) and k.shape[1] == q.shape[1], "expects the pass-through cache"
        if self.capturing:
            out = self._question_attention(mem, q, k, v, call.scaling)
        else:
            w, t = self.params.window, q.shape[1]
            if call.layer_idx == 0:
                self.budget.start_forward(math.ceil(t / w))
            outs = [
                self._window(mem, call, i // w, (q[:, i : i + w], k[:, i : i + w], v[:, i : i + w]), t == 1)
                for i in range(0, t, w)
            ]
            out = torch.cat(outs, dim=1)
        return out.to(call.query.dtype).transpose(0, 1).unsqueeze(0).contiguous()

    def _probs(self, q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax [Hkv, g, w, n] of grouped queries q [Hq, w, D] over keys k [Hkv, n, D] (causal if mask None)."""
        hkv, w = k.shape[0], q.shape[1]
        qg = q.float().reshape(hkv, -1, q.shape[-1])
        logits = (qg @ k.float().transpose(1, 2) * scaling).view(hkv, -1, w, k.shape[1])
        if mask is None:
            mask = torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)

    @staticmethod
    def _weighted(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """probs [Hkv, g, w, n] x values [Hkv, n, D] -> [Hq, w, D]."""
        hkv, g, w, n = probs.shape
        return (probs.reshape(hkv, g * w, n) @ v.float()).view(hkv * g, w, -1)

    def _select(self, mem: ContextMemory, layer: int, window_idx: int, probe_q: torch.Tensor, decoding: bool):
        """Indices (sorted) of the blocks this window attends; updates the activation statistics."""
        h = probe_q.float().transpose(0, 1).reshape(probe_q.shape[1], -1)  # [w, Hq*D]
        weights = mem.stats.weights(h)
        if mem.num_blocks == 0:
            self.budget.last[layer] = 0
            return None
        scores = mem.block_scores(weights @ h)
        if not decoding and mem.question is not None:
            scores = scores + self.params.question_weight * mem.block_scores(mem.question)
        k = self.budget.take(layer, window_idx, scores, entropy_split=decoding)
        return scores.topk(k).indices.sort().values

    def _window(self, mem: ContextMemory, call: AttentionCall, window_idx: int, qkv, decoding: bool) -> torch.Tensor:
        """Attention output [Hq, w, D] of one window of queries; then the memory advances."""
        (q, k, v), layer = qkv, call.layer_idx
        p, rot, dev = self.params, self.inv_freq, q.device
        mem.append(k, v)
        w, r = q.shape[1], mem.recent_len
        rotated = p.positions != "inf_llm"  # global keys carry positions of their own
        probe_q = rotate(q, torch.full((w,), p.n_local, device=dev), rot)
        chosen = self._select(mem, layer, window_idx, probe_q, decoding)
        n_chosen = 0 if chosen is None else chosen.numel() * p.block_size
        n_init = mem.init_k.shape[1]
        # local part: the last n_local + w - 1 recent tokens, relative (or absolute) positions
        n_loc = min(r, p.n_local + w - 1)
        slots = torch.arange(n_loc, device=dev)
        if p.positions == "absolute":
            recent_base = mem.recent_start
        elif p.positions == "ordered":  # init, chosen blocks, recent tokens: consecutive slots
            recent_base = n_init + n_chosen
        else:
            recent_base = 0
        base = recent_base + r - n_loc if rotated else 0
        q_loc = rotate(q, base + slots[n_loc - w :], rot)
        k_loc = rotate(mem.rec_k[:, r - n_loc :], base + slots, rot)
        dist = slots[n_loc - w :, None] - slots[None, :]
        masks = [(dist >= 0) & (dist < p.n_local)]
        keys, values = [k_loc], [mem.rec_v[:, r - n_loc :]]
        # global part: retrieved blocks, init tokens, recent tokens older than each query's window
        g_keys, g_values, g_pos = [], [], []
        if chosen is not None and chosen.numel():
            bk, bv = mem.gather_blocks(chosen)
            g_keys.append(bk)
            g_values.append(bv)
            if p.positions == "ordered":
                g_pos.append(n_init + torch.arange(n_chosen, device=dev))
            elif rotated:
                offs = torch.arange(p.block_size, device=dev)
                g_pos.append((n_init + chosen.to(dev)[:, None] * p.block_size + offs).reshape(-1))
        n_rem = max(0, r - p.n_local)
        for part_k, part_v, begin in (
            (mem.init_k, mem.init_v, 0),
            (mem.rec_k[:, :n_rem], mem.rec_v[:, :n_rem], recent_base),
        ):
            if part_k.shape[1]:
                g_keys.append(part_k)
                g_values.append(part_v)
                if rotated:  # under inf_llm every global key stays at position 0
                    g_pos.append(begin + torch.arange(part_k.shape[1], device=dev))
        if g_keys:
            gk = torch.cat(g_keys, dim=1)
            if rotated:
                gk = rotate(gk, torch.cat(g_pos), rot)
            keys.append(gk)
            values.append(torch.cat(g_values, dim=1))
            n_fixed = gk.shape[1] - n_rem
            q_dist = (r - w + torch.arange(w, device=dev))[:, None] - torch.arange(n_rem, device=dev)[None, :]
            fixed = torch.ones(w, n_fixed, dtype=torch.bool, device=dev)
            masks.append(torch.cat([fixed, q_dist >= p.n_local], dim=1))
        q_glob = q_loc if rotated else probe_q
        out = self._merged((q_loc, q_glob), keys, values, masks, call.scaling, mem)
        self._count(layer, masks)
        mem.advance()
        return out

    def _merged(self, queries, keys, values, masks, scaling, mem: ContextMemory) -> torch.Tensor:
        """One softmax over local and global keys (exact log-sum-exp merge); records local scores."""
        hkv, w = keys[0].shape[0], queries[0].shape[1]
        logits = []
        for q, key, mask in zip(queries, keys, masks, strict=False):
            qg = (q.float() * scaling).reshape(hkv, -1, q.shape[-1])
            part = (qg @ key.float().transpose(1, 2)).view(hkv, -1, w, key.shape[1])
            logits.append(part.masked_fill_(~mask, float("-inf")))
        probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
        n_loc = keys[0].shape[1]
        mem.add_local_scores(probs[..., :n_loc].sum(dim=2).reshape(-1, n_loc))
        out = self._weighted(probs[..., :n_loc], values[0])
        if len(keys) > 1:
            out = out + self._weighted(probs[..., n_loc:], values[1])
        return out

    def _count(self, layer: int, masks: list[torch.Tensor]) -> None:
        per_query = sum(m.sum(dim=1) for m in masks)
        self.attended[layer] += int(per_query.sum())
        self.queries[layer] += per_query.shape[0]
        self.max_attended = max(self.max_attended, int(per_query.max()))

    # -- reporting ------------------------------------------------------------------------------
    def stats(self) -> KVStats:
        p = self.params
        layers = [m for m in self.cache.layers if isinstance(m, ContextMemory) and m.is_initialized]
        queries = sum(self.queries)
        return KVStats(
            tokens_seen=self.tokens_seen,
            tokens_kept=max((m.tokens_held for m in layers), default=0),
            kv_bytes_kept=sum(m.nbytes() for m in layers),
            kv_bytes_full=self.info.kv_bytes_per_token * self.tokens_seen,
            extra={
                "positions": p.positions,
                "blocks": max((m.num_blocks for m in layers), default=0),
                "kv_budget_tokens": p.n_init + p.n_local + p.topk * p.block_size,
                "attended_keys_mean": round(sum(self.attended) / queries, 1) if queries else 0.0,
                "attended_keys_max": self.max_attended,
                "blocks_last_step": list(self.budget.last),
            },
        )


@register
class ActQKVPolicy(Policy):
    name = "actqkv"
    paper = "2502.13542"
    Params = ActQKVParams
    session_class = ActQKVSession
    extends_context = True
    summary = "InfLLM-style block memory, activation-weighted probe retrieval, entropy-driven per-layer budget"

    def context_limit(self, params, info):
        return None if params.positions != "absolute" else info.max_context

    def kv_bytes_needed(self, params, info, num_tokens: int) -> int:
        # every token is kept; the block store grows by doubling (up to twice the blocks held), with a
        # representative (fp32, Hq x D) per block and an fp32 local score per recent token and query head
        blocks = 2 * math.ceil(num_tokens / params.block_size)
        reprs = blocks * info.num_heads * info.head_dim * FP32_BYTES * info.num_layers
        return 2 * info.kv_bytes_per_token * num_tokens + reprs

    def step_bytes_needed(self, params, info, num_tokens: int, chunk: int, query_tokens: int = 0) -> int:
        hq, hkv, d = info.num_heads, info.num_kv_heads, info.head_dim
        w = params.window
        keys = min(num_tokens, params.attended_keys) + w
        # one window: local + global logits, their concatenation, the softmax and a sliced copy (fp32);
        # the gathered and rotated keys and values
        window = 4 * hq * w * keys * FP32_BYTES + 4 * hkv * keys * d * FP32_BYTES
        # the block store of one layer is copied while it doubles
        growth = info.kv_bytes_per_token // max(info.num_layers, 1) * 2 * num_tokens
        question = 0
        if query_tokens and params.question_weight > 0:
            n = query_tokens
            rows = min(n, max(1, QUESTION_PIECE_ELEMENTS // (hq * n)))
            question = 3 * hq * rows * n * FP32_BYTES + 3 * hq * n * d * FP32_BYTES + pass_bytes(info, n, chunk)
        return max(window + growth, question)
