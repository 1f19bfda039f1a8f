"""InfiniRetri: read a long context in chunks and keep the sentences the model's attention retrieves.

Infinite Retrieval: Attention Enhanced LLMs in Long-Context Processing, Ye, Wang & Wang, 2025,
https://arxiv.org/abs/2502.12962 (reference code: the PyPI package `infini-retri` 0.0.3).

Algorithm: the prompt is split into instruction (kept verbatim), context and question. The
context is cut into sentences and packed into chunks of at most `chunk_tokens` whole sentences.
For each chunk, one forward over instruction + sentences retained so far + chunk + question
(fresh positions, throwaway cache) gives, in one layer, the attention of every question token to
every candidate token, summed over heads, summed over a centred window of `window` tokens
("phrases"), and weighted per question row by the square of the attention that row pays inside
the question (computed at the first scored chunk). The `top_k` best tokens select sentences:
every sentence that contains one is retained, the rest is dropped; old and new sentences compete
again at every chunk. After the last chunk the real cache is rebuilt from instruction + retained
sentences + question, and generation continues normally from there with the request's sampling.

Prompt layout (how the request's own template is preserved):
- Chat: the context is the last user message; everything before it (the rendered template,
  system prompt, earlier turns) is the instruction, kept token for token. Completions: the whole
  prompt is the context (leading special tokens such as BOS are kept as the instruction).
- The question: `kv_policy.query` if given. If it occurs in that text, its last occurrence
  starts the question; otherwise it is appended after the context as "\\n\\n" + query. Without a
  query, the question is the text after the last blank line, or after the last line break when
  that paragraph is longer than `max_question_tokens`; a text with no line break is all question
  (nothing to read). The question runs to the end of the prompt, so it includes the chat
  template's closing tokens and assistant header, as in the reference.
- Kept sentences are the prompt's own token ids, so when every sentence is kept the rebuilt
  prompt is the original prompt, token for token.

Deviations from the reference, and why:
- Scoring layer: the reference uses the last layer, and so does the preset `infiniretri` (with no
  sink positions left out). On small models the last layer is a poor retriever
  (docs/results/infiniretri.md, "Choice of the scoring layer"), so the layer is configurable
  (`layer`, negative counts from the end; -1 = the paper); unset (the parameters' default, preset
  `infiniretri_62`) it is taken at `layer_depth` of the stack (0.62, tuned on the embedded model);
  `layer: calibrated` (preset `infiniretri_calibrated`) takes the layer whose heads have the highest
  mean retrieval score in the model's retrieval-head profile (`kvmux calibrate`).
- Attention sinks: the first `sink_tokens` positions of each scoring input are left out of the
  ranking (their attention is zeroed before smoothing), so sink mass does not spill into
  neighbouring tokens' phrase scores.
- Only the question rows of the scoring layer are materialised (exact fp32 softmax); other
  layers use dense SDPA and the forward stops after the scoring layer, since the layers above
  cannot change its attention. The reference runs eager attention with all layers' maps.
  Stopping is done by raising `_ProbeDone` from the scoring layer's attention and catching it
  around the forward: transformers' model forwards have no early exit, and running only the
  first layers would mean re-implementing each architecture's forward (embeddings, rotary
  tables, masks, norms) or editing the shared model's layer list while other requests use it.
  The exception is private to `session.py`, raised only in a scoring forward (throwaway cache,
  no tokens counted) and caught by the one method that started that forward.
- Sentences are split in token space (line breaks also end a sentence; see `sentences.py`) and
  kept as token ids instead of being decoded and re-encoded, so no tokenisation drift.
- When the candidates of a chunk number at most `top_k`, all are kept without a forward (the
  reference's scoring would keep them all too).
- The last two chunks are not rebalanced; the retained text is capped so that every scoring
  input and the final prompt leave `chunk_tokens` of the model's context free (lowest-scoring
  sentences go first).
- The final answer is decoded with the request's sampling settings (the reference samples at
  temperature 0.5).
- Bounded question: the question rows of the scoring layer are scored in pieces of rows (at most
  `ROW_PIECE_ELEMENTS` fp32 scores per piece; the same rows as one computation), the default
  question paragraph is at most `max_question_tokens` (512, capped at 4096), a `kv_policy.query`
  at most the server's `max_query_tokens` (1024), and any question must leave `chunk_tokens` of
  the model's context free. A query found in the prompt starts the question at its last
  occurrence, so that question is bounded by the context check alone.

Modules: `params.py` (parameters), `prompt_layout.py` (instruction, context and question),
`sentences.py` (sentences and chunks over token ids), `scoring.py` (question rows, phrase scores,
sentence selection), `session.py` (one request: reading, then the rebuilt prompt). Measurements:
docs/results/infiniretri.md.
"""

from __future__ import annotations

from kvmux.policies.base import FP32_BYTES, Policy, dense_step_bytes, pass_bytes
from kvmux.policies.infiniretri.params import InfiniRetriParams
from kvmux.policies.infiniretri.prompt_layout import prompt_layout
from kvmux.policies.infiniretri.scoring import ROW_PIECE_ELEMENTS
from kvmux.policies.infiniretri.session import InfiniRetriSession, scoring_layer
from kvmux.policies.registry import register


@register
class InfiniRetriPolicy(Policy):
    name = "infiniretri"
    paper = "2502.12962"
    Params = InfiniRetriParams
    session_class = InfiniRetriSession
    extends_context = True
    summary = "reads the context in sentence chunks, keeps sentences the question attends to"

    def check_prompt(self, params, info, request, prompt_ids: list[int]) -> None:
        scoring_layer(params, info)  # e.g. 'calibrated' on a model without a retrieval-head profile
        prompt_layout(params, info, request, prompt_ids)

    def step_bytes_needed(self, params, info, num_tokens: int, chunk: int, query_tokens: int = 0) -> int:
        # a scoring forward reads instruction + retained sentences + chunk + question in one pass (at most
        # the model's context) up to the scoring layer, with a throwaway cache; the question rows of that
        # layer are scored in pieces (fp32 scores, masked, softmax; the keys repeated per query head)
        hq, d = info.num_heads, info.head_dim
        seq = min(num_tokens + query_tokens + 2, info.max_context)
        rows = min(seq, max(1, ROW_PIECE_ELEMENTS // (hq * seq)))
        scoring = 3 * hq * rows * seq * FP32_BYTES + hq * seq * d * FP32_BYTES + seq * seq * FP32_BYTES
        forward = pass_bytes(info, seq, chunk) + dense_step_bytes(seq, seq) + info.kv_bytes_per_token * seq
        final = super().step_bytes_needed(params, info, seq, chunk)
        return max(scoring + forward, final)
