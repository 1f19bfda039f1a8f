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
   times the cosine with the question vector while reading the prompt, when the request has a
   question: see "The question" below). One selection per layer, shared by all heads.
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
  an unordered set; what that costs beyond the model's context, and which presets recover it, is
  in docs/results/actqkv.md ("Why the misses happen", "Ordered positions and a smaller budget").
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
- The question (`question`): `kv_policy.query` when the request gives it; otherwise, under
  `auto` (the default), the prompt's trailing paragraph - the text after the last blank line of
  the last user message (chat) or of the prompt (completions), or after its last line break when
  that paragraph is longer than `max_question_tokens` (1024, the server's `max_query_tokens`),
  and at most that many of its last tokens; a prompt without a line break has none. The rule is
  InfiniRetri's (`policies/question_text.py`, shared). `query` reads `kv_policy.query` only,
  `off` builds no question. The reference string-matches a dataset-specific question inside the
  prompt and uses in-context queries; here the question's tokens are run alone (positions
  0..n-1) before the prompt and, per layer and head, the `repr_topk` question queries that
  received the most attention are averaged into the question vector. As in the reference it
  only applies while the prompt is read, not while decoding. The question's attention over
  itself is computed in pieces of query rows, each against the keys up to its last row (at most
  `QUESTION_PIECE_ELEMENTS` fp32 scores per piece), and the attention each key received is summed
  over the pieces: the same result up to float rounding, in O(piece x n) memory instead of three
  n x n copies per head. The server caps `kv_policy.query` at `max_query_tokens` (1024 by default).
- Serving caps (the reference has none): window <= 512, n_local <= 4096, n_init <= 1024,
  block_size <= 256, topk and min_blocks <= 1024, and at most `MAX_ATTENDED_KEYS` (16384) keys per
  query (n_init + max(2*topk, min_blocks)*block_size + n_local + window), so one window's scores
  (window x keys per head, fp32) stay bounded. Every shipped preset is well inside them.
- "Prompt phase" means the session's prefill (every prompt chunk, a one-token last chunk too),
  "decoding" the forwards after it (the reference switches after its first 32K-token forward).
  The equal split applies to the prompt, the entropy split to decoding, as in the reference for
  prompts up to 32K.
- A layer with fewer than 2 blocks takes them all without recording an entropy sample or
  drawing from the pool (the reference records a 0 sample when it has no block).
- Each query sees its exact local window and, globally, only remainder tokens older than it;
  the reference's offset makes one token per window visible in both parts.
- Retrieval layers (`retrieval_layers` = N, an extension; preset `actqkv_rh`): the N layers whose heads
  have the best mean retrieval score in the model's calibrated profile (Retrieval Heads, arXiv
  2404.15574; `kvmux calibrate`) attend every block instead of a selection, outside the pool, as
  DuoAttention keeps its retrieval heads' full KV. Why: on prose haystacks the layer holding the
  embedded model's best retrieval heads (18) ranks the needle's block below its share of the pool
  while the other layers retrieve it (docs/results/actqkv.md, "Prose"). Such a layer reads every key
  of the request, so its window's scores grow with the prompt (the step estimate counts it).
- No on-device LRU block cache: blocks live on the compute device, or on CPU with `offload`
  (the chosen blocks are copied per step). Block-hit LRU scores are therefore not kept.

Modules: `params.py` (parameters and caps), `session.py` (one request: windows, local and global
attention, positions), `block_budget.py` (the dynamic cut-off), `question.py` (the question and
its vector), `grouped_attention.py` (the softmax and its merge), `context_memory.py` (the memory and
the Activation-Bias statistics). Measurements: docs/results/actqkv.md.
"""

from __future__ import annotations

import math

from kvmux.policies.actqkv.params import ActQKVParams
from kvmux.policies.actqkv.question import QUESTION_PIECE_ELEMENTS, question_tokens_bound
from kvmux.policies.actqkv.session import ActQKVSession
from kvmux.policies.base import FP32_BYTES, Policy, pass_bytes
from kvmux.policies.registry import register
from kvmux.policies.retrieval_heads import retrieval_layer_set


@register
class ActQKVPolicy(Policy):
    name = "actqkv"
    paper = "2502.13542"
    Params = ActQKVParams
    session_class = ActQKVSession
    extends_context = True
    summary = "InfLLM-style block memory, activation-weighted probe retrieval, entropy-driven per-layer budget"

    def check_prompt(self, params, info, request, prompt_ids) -> None:
        retrieval_layer_set(info, params.retrieval_layers, self.name)  # a profile exists when layers are asked for

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
        # a retrieval layer (`retrieval_layers`) attends every block: its window reads every key
        keys = (num_tokens if params.retrieval_layers else min(num_tokens, params.attended_keys)) + w
        # one window: local + global logits, their concatenation, the softmax and a sliced copy (fp32);
        # the gathered and rotated keys and values
        window = 4 * hq * w * keys * FP32_BYTES + 4 * hkv * keys * d * FP32_BYTES
        # the block store of one layer is copied while it doubles
        growth = info.kv_bytes_per_token // max(info.num_layers, 1) * 2 * num_tokens
        question = 0
        n = question_tokens_bound(params, num_tokens, query_tokens)
        if n:
            rows = min(n, max(1, QUESTION_PIECE_ELEMENTS // (hq * n)))
            question = 3 * hq * rows * n * FP32_BYTES + 3 * hq * n * d * FP32_BYTES + pass_bytes(info, n, chunk)
        return max(window + growth, question)
