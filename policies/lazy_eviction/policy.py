"""LazyEviction: lagged KV eviction driven by how often tokens come back into focus.

LazyEviction: Lagged KV Eviction with Attention Pattern Observation for Efficient Long
Reasoning, arXiv 2506.15969 (ACL 2026). Reference code: Halo-949/LazyEviction
(`model/kv_utils.py`, `model/temp_cacheobs.py`).

Algorithm (decode phase; the prompt is kept whole):
- Every decode step t observes the current query's softmax attention over the cache. Per layer,
  token and query head it keeps TS, the last step the token was attended with probability
  >= `alpha`, and MRI, its maximum recurrence interval (the longest gap between two such steps).
  Prompt tokens start with TS = 0; a token decoded at step t starts with TS = t - 1, MRI = 0.
- Every `window` (W) steps, once the cache holds more than `budget` (B) tokens, evict: keep the W
  newest tokens plus the B - W others with the highest score I = H1 + H2, with (as in the code)
  H1 = 2*sigmoid(-1 - (t - TS) / (MRI + 1e-5)) (recency relative to the token's own rhythm) and
  H2 = 2*sigmoid(1 - MRI) if MRI > 0 else 0 (short recurrence intervals score high). The step's
  output already used the full cache, so the cache swings between B and B + W.
- `window: auto` sets W to the `window_percentile` (80th) percentile of the MRIs the recorder
  observes, as the paper tunes W. Observation source: the last `calibration_rows` prompt rows,
  run through the same recorder as if they were the first decode steps (prompt tokens before
  them start at TS = 0). Only those rows' scores are computed, per layer, in blocks of rows, and
  only the test p >= alpha is kept (score >= logsumexp + log alpha); the prompt's own attention
  runs through SDPA. Cost: about calibration_rows / prompt_length of the prompt's attention-score
  work. Intervals longer than calibration_rows cannot be observed, so W <= calibration_rows. With
  no prompt to observe (a stream fed token by token from the start), W is taken from the live
  decode state the first time the cache exceeds B.

Decode cost: one [Hq, 1, L] score row per layer, computed per KV-head group (keys are never
repeated); the step's output is computed from the same fp32 probabilities (cast to the model dtype
for the value product, as transformers' eager attention does), so K is read once. The step's
threshold test is stored and TS/MRI catch up every few steps (`recurrence.py`). Every W steps:
an fp32 score, a sort and a gather over B + W tokens per KV head. State: two int32 [Hq, L] per layer.

Deviations from the paper / reference code:
- GQA: the reference repeats K/V to every query head before caching (G times the memory) and
  selects per query head. Here K/V stay in native GQA layout and each KV head keeps its own token
  set: TS/MRI stay per query head, and the scores of the query heads sharing a KV head are
  combined (`group_score`, max by default: a token any head of the group relies on survives).
- Score formulas follow the code (extra +1 inside H1, H2 = 2*sigmoid(1 - MRI)), not the paper's
  printed forms. Step counters, TS and MRI are integers (the reference keeps them in fp16, which
  rounds timestamps past 2048); scores are fp32 and ties go to the older token, so rankings can
  differ from the reference's fp16 tie order.
- W is calibrated per request from its own prompt (the paper calibrates offline on ~1% of the
  test set). The parameter defaults (and the `lazy_eviction` preset) are fixed values, not the
  paper's Llama setting: α 1e-4 is the reference's CLI default and its Qwen value (its Llama-8B runs
  use 5e-4), W 64 is fixed where the paper takes the 80th-percentile recurrence interval.
- Budget as a fraction: the paper's r (KV used / full KV of prompt + output) fixes B for the whole
  request, which needs the request's output length; a session does not know it. Instead,
  `budget_seen_fraction` f sets B = ceil(f * tokens seen so far), recomputed at every eviction, so B
  grows with the request and the cache stays near f of a full cache at every step. The prompt is
  still kept whole until the first eviction (step W), which then keeps f of it (with f 0.5, half).
- Multi-token forwards after the prompt (teacher-forced chunks) are observed row by row as
  consecutive decode steps; evictions then happen after the forward in which a multiple of W was
  reached, so the peak is B + W + chunk - 1 unless the chunk size divides W.
- Survivors stay in time order (the reference stores them in top-k order; both are equivalent
  because keys are already rotated at their absolute positions, which never change).
- Ties (e.g. every token attended above alpha each step, as happens with flat attention over short
  caches) go to the older token; the reference leaves them to torch.topk's order.
- A prompt longer than B is kept whole, as in the reference: the cache holds prompt + up to W
  tokens until the first eviction, and B + W at most afterwards.
- Batch size 1 per session (the reference's state is global and also batch 1); masks are taken to
  be causal (no padding), which is what a batch-1 request produces.

Modules: this one (parameters, session, policy), `recurrence.py` (TS/MRI and the score),
`eviction.py` (grouped attention rows and the keep-and-gather math). Measurements:
docs/results/lazy_eviction.md.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from kvmux.policies.base import FP32_BYTES, AttentionCall, Policy, PolicyParams, PolicySession
from kvmux.policies.dense import dense_attention
from kvmux.policies.lazy_eviction.eviction import (
    gather_tokens,
    grouped_activations,
    grouped_output,
    grouped_probs,
    percentile_from_counts,
    reduce_groups,
    select_recent_and_top,
)
from kvmux.policies.lazy_eviction.recurrence import RecurrenceState, recurrence_score
from kvmux.policies.prefix import PrefixReuse
from kvmux.policies.registry import register

# elements of one [Hq, L, rows] block of observed query rows (bounds the transient memory; larger
# on CUDA, where the cost is in the number of kernel launches rather than in memory traffic)
BLOCK_ELEMENTS = {"cuda": 1 << 25}
BLOCK_ELEMENTS_DEFAULT = 1 << 22


class LazyEvictionParams(PolicyParams):
    budget: int = Field(
        1024, ge=1, le=131072, description="B: tokens per KV head kept after an eviction (at most 131072)"
    )
    budget_seen_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="if set, B = ceil(fraction * tokens seen so far), recomputed at every eviction, replacing "
        "budget (not the paper's r, which fixes B from prompt + output length)",
    )
    window: Annotated[int, Field(ge=1, le=8192)] | Literal["auto"] = Field(
        64, description="W: steps between evictions and newest tokens always kept (at most 8192); 'auto' = calibrate"
    )
    alpha: float = Field(1e-4, gt=0, lt=1, description="a token counts as attended when its probability >= alpha")
    window_percentile: float = Field(80, gt=0, le=100, description="auto W: percentile of observed MRIs (paper: 80)")
    calibration_rows: int = Field(512, ge=1, le=8192, description="auto W: last prompt rows observed (at most 8192)")
    group_score: Literal["max", "mean"] = Field("max", description="how a KV head combines its query heads' scores")


class LazyEvictionSession(PolicySession):
    params: LazyEvictionParams

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        layers, device = self.info.num_layers, self.info.device
        self.steps = 0  # decode steps observed (t)
        self.state = [RecurrenceState(self.info.num_heads, device) for _ in range(layers)]
        # absolute positions [Hkv, n] of the tokens kept by the last eviction; every later token
        # is appended behind them, so the rest of the cache is the last tokens seen, in order
        self._kept: list[torch.Tensor | None] = [None] * layers
        self.window: int | None = None if self.params.window == "auto" else int(self.params.window)
        self.window_source = "fixed" if self.window is not None else "pending"
        self.evictions = 0
        self.tokens_evicted = 0  # per layer and KV head
        self.peak_tokens = 0
        self._in_prefill = False
        self._calib_from: int | None = None  # absolute position of the first observed prompt row
        self._calib: list[RecurrenceState] | None = None

    # -- budget ---------------------------------------------------------------------------------
    def budget(self) -> int:
        if self.params.budget_seen_fraction is not None:
            return max(1, math.ceil(self.params.budget_seen_fraction * self.tokens_seen))
        return self.params.budget

    # -- attention --------------------------------------------------------------------------------
    def attention(self, call: AttentionCall) -> torch.Tensor:
        if call.query.shape[0] != 1:
            raise ValueError("lazy_eviction sessions run one sequence at a time (batch 1)")
        if self._in_prefill:
            out = dense_attention(call)
            if self._calib is not None:
                first_row = max(0, self._calib_from - self.tokens_seen)
                if first_row < call.query.shape[2]:
                    done = max(0, self.tokens_seen - self._calib_from)  # prompt rows observed so far
                    self.observe_rows(self._calib[call.layer_idx], call, first_row, done + 1, with_output=False)
            return out
        return self.observe_rows(self.state[call.layer_idx], call, 0, self.steps + 1, with_output=True)

    def observe_rows(
        self, state: RecurrenceState, call: AttentionCall, first_row: int, first_step: int, with_output: bool
    ) -> torch.Tensor | None:
        """Record query rows first_row.. of `call` as steps first_step.. into `state`. With `with_output`,
        return the attention output [1, Tq, Hq, D] (from the same probabilities for a single row).
        Public so that a composed preset's prefill part can feed LazyEviction's prompt calibration."""
        tq, length = call.query.shape[2], call.key.shape[2]
        base = length - tq  # cache index of the call's first token
        device = call.key.device
        if state.length < base + first_row:  # tokens that arrived unobserved (the prompt)
            state.append(torch.full((base + first_row - state.length,), first_step - 1, device=device))
        if tq == 1 and first_row == 0:
            probs = grouped_probs(call.query, call.key, call.scaling)  # [Hq, 1, L]
            state.observe_step(probs[:, 0], self.params.alpha, first_step)  # recorded in arrears
            return grouped_output(probs, call.value) if with_output else None
        block = max(1, BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS_DEFAULT) // (call.query.shape[1] * length))
        for start in range(first_row, tq, block):
            stop = min(tq, start + block)
            step0 = first_step + start - first_row
            state.append(torch.arange(step0 - 1, step0 - 1 + stop - start, device=device))
            visible = call.key[:, :, : base + stop]
            active = grouped_activations(call.query[:, :, start:stop], visible, call.scaling, self.params.alpha)
            state.record(active, step0)
        return dense_attention(call) if with_output else None

    # -- phases ---------------------------------------------------------------------------------
    def prefill(self, runner, input_ids):
        calibrate = self.window is None and input_ids.shape[1] > 0
        if calibrate:
            rows = min(self.params.calibration_rows, input_ids.shape[1])
            self._calib_from = self.tokens_seen + input_ids.shape[1] - rows
            self._calib = [RecurrenceState(self.info.num_heads, self.info.device) for _ in self.state]
        self._in_prefill = True
        try:
            logits = yield from super().prefill(runner, input_ids)
        finally:
            self._in_prefill = False
            if calibrate:
                self.set_window_from(self._calib, "prefill")
                self._calib = None
        return logits

    def after_forward(self, num_tokens: int) -> None:
        length = self.cache.layers[0].keys.shape[-2]
        self.peak_tokens = max(self.peak_tokens, length)
        if self._in_prefill:
            return
        for state in self.state:
            if state.buffer_full:
                state.flush()  # between steps, so that a step's `checkpoint` never spans a flush
        before, self.steps = self.steps, self.steps + num_tokens
        budget = self.budget()
        if length <= budget:
            return
        if self.window is None:
            self.set_window_from(self.state, "decode")
            if self.window is None:
                return
        if self.steps // self.window > before // self.window:
            self.evict(budget)

    def set_window_from(self, states: list[RecurrenceState], source: str) -> None:
        """W = the configured percentile of the observed MRIs (tokens attended at least once)."""
        observed = torch.cat([state.mri[state.mri > 0].flatten().long().cpu() for state in states])
        window = percentile_from_counts(torch.bincount(observed), self.params.window_percentile)
        if window is not None:
            self.window, self.window_source = max(1, window), source

    def evict(self, budget: int) -> None:
        """Keep, per layer and KV head, the W newest tokens and the best B - W others."""
        dropped = 0
        for i, layer in enumerate(self.cache.layers):
            length = layer.keys.shape[-2]
            if length <= budget:
                continue
            state = self.state[i]
            assert state.length == length, "recurrence state out of step with the cache"
            score = recurrence_score(state.ts, state.mri, self.steps)
            index = select_recent_and_top(
                reduce_groups(score, self.info.num_kv_heads, self.params.group_score), budget, self.window
            )
            self._kept[i] = gather_tokens(self.kept_positions(i), index)
            layer.keys = gather_tokens(layer.keys, index)
            layer.values = gather_tokens(layer.values, index)
            state.keep(index)
            dropped = max(dropped, length - budget)
        if dropped:
            self.evictions += 1
            self.tokens_evicted += dropped

    # -- reporting -------------------------------------------------------------------------------
    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Absolute positions [Hkv, L] of the tokens layer `layer_idx` holds, in cache order."""
        device, heads = self.info.device, self.info.num_kv_heads
        kept = self._kept[layer_idx]
        if kept is None:
            kept = torch.zeros(heads, 0, dtype=torch.long, device=device)
        layer = self.cache.layers[layer_idx]
        length = layer.keys.shape[-2] if getattr(layer, "keys", None) is not None else 0
        recent = torch.arange(self.tokens_seen - (length - kept.shape[1]), self.tokens_seen, device=device)
        return torch.cat([kept, recent[None, :].expand(heads, -1)], dim=1)

    def checkpoint(self):
        # recurrence states are replaced, never mutated in place: references and pending counts suffice
        return super().checkpoint(), [state.mark() for state in self.state]

    def restore(self, checkpoint) -> None:
        cache_lengths, marks = checkpoint
        super().restore(cache_lengths)
        for state, mark in zip(self.state, marks, strict=True):
            state.rewind(mark)

    def stats(self):
        stats = super().stats()
        stats.extra.update(
            budget=self.budget(),
            window=self.window,
            window_source=self.window_source,
            evictions=self.evictions,
            tokens_evicted=self.tokens_evicted,
            peak_tokens_kept=self.peak_tokens,
            decode_steps=self.steps,
        )
        return stats

    def close(self) -> None:
        super().close()
        self.state, self._kept, self._calib = [], [], None


@register
class LazyEvictionPolicy(Policy):
    name = "lazy_eviction"
    paper = "2506.15969"
    Params = LazyEvictionParams
    session_class = LazyEvictionSession
    batched_decode = True  # a decode step is one query row through the session's own attention
    summary = "lagged eviction every W steps: W newest + top tokens by recurrence-interval score"

    def prefix_reuse(self, params, info, chunk: int) -> PrefixReuse:
        # the prompt is kept whole (evictions start with decoding); `window: auto` observes the
        # prompt's last `calibration_rows` rows, which must then be prefilled by the request itself
        tail = params.calibration_rows if params.window == "auto" else 1
        return PrefixReuse(min_tail=tail)

    def step_bytes_needed(self, params, info, num_tokens: int, chunk: int, query_tokens: int = 0) -> int:
        heads = info.num_heads
        row = heads * num_tokens  # one observed row over every key, all query heads
        # decode: fp32 scores and probabilities of one row; eviction: the score (and its terms) and a sort
        decode = 6 * row * FP32_BYTES + row * 8
        calibration = 0
        if params.window == "auto":  # blocks of prompt rows: fp32 scores, the threshold test, the state update
            limit = BLOCK_ELEMENTS.get(info.device.type, BLOCK_ELEMENTS_DEFAULT)
            rows = min(params.calibration_rows, num_tokens, max(1, limit // max(row, 1)))
            calibration = rows * row * (FP32_BYTES + 1 + 2 * 4)
        return super().step_bytes_needed(params, info, num_tokens, chunk) + max(decode, calibration)
