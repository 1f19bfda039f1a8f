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
- Scoring layer: the reference uses the last layer. On small models the last layer is a poor
  retriever (on the embedded model the needle ranks far lower in the last layer than in the
  middle layers; measurements in docs/results/infiniretri.md, "Choice of the scoring layer"), so the
  layer is configurable (`layer`, negative counts from the end; -1 = the paper) and by default
  taken at `layer_depth` of the stack (0.62: layer 18 of 30).
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
  The exception is private to this module, raised only in a scoring forward (throwaway cache,
  no tokens counted) and caught by the one function that started that forward.
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
"""

from __future__ import annotations

import re
from collections.abc import Generator
from dataclasses import dataclass

import torch
from pydantic import Field
from transformers import DynamicCache

from kvmux.policies.base import (
    FP32_BYTES,
    AttentionCall,
    Policy,
    PolicyInputError,
    PolicyParams,
    PolicySession,
    SessionRequest,
    dense_step_bytes,
    pass_bytes,
)
from kvmux.policies.dense import attention_probs, causal_mask, dense_attention
from kvmux.policies.infiniretri.sentences import (
    Span,
    decode,
    gather,
    pack_chunks,
    sentence_spans,
    span_length,
    token_boundary,
    token_pieces,
)
from kvmux.policies.registry import register

# fp32 score elements of one piece of question rows in the scoring layer (x3 copies: scores, masked, softmax)
ROW_PIECE_ELEMENTS = 1 << 22


class InfiniRetriParams(PolicyParams):
    chunk_tokens: int = Field(
        1024, ge=16, le=16384, description="context tokens read per chunk (paper: 1024; at most 16384)"
    )
    top_k: int = Field(
        300, ge=1, le=16384, description="best-scored tokens whose sentences are kept (paper: 300; at most 16384)"
    )
    window: int = Field(
        8, ge=1, le=256, description="phrase window: token scores summed over this many (paper: 8; at most 256)"
    )
    layer: int | None = Field(
        None, ge=-1024, le=1023, description="scoring layer (negative from the end; -1 = last, the paper)"
    )
    layer_depth: float = Field(0.62, ge=0.0, le=1.0, description="when layer is unset: fraction of the layer stack")
    sink_tokens: int = Field(
        4, ge=0, le=1024, description="first positions of each scoring input left out (at most 1024)"
    )
    question_weight: bool = Field(True, description="weight question rows by their in-question attention squared")
    max_question_tokens: int = Field(
        512, ge=1, le=4096, description="longest default question paragraph (at most 4096)"
    )


@dataclass(slots=True)
class PromptLayout:
    """The prompt as instruction + context span + question (token ids of the original prompt)."""

    prefix: list[int]
    context: Span
    question: list[int]
    source: str  # how the question was found


class _ProbeDone(Exception):
    """Raised inside the scoring forward once the scoring layer's rows are captured."""


@dataclass(slots=True)
class _Probe:
    layer: int
    question_start: int
    rows: torch.Tensor | None = None  # [R, N] question rows' probabilities, summed over heads


def _last_user_text(messages: list[dict]) -> str | None:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else None
    return None


def _default_question_starts(region: str) -> list[tuple[int, str]]:
    """Candidate question starts in `region` (character offsets), preferred first."""
    text = region.rstrip()
    starts = []
    blank = [m.end() for m in re.finditer(r"\n[ \t]*\n", text)]
    if blank:
        starts.append((blank[-1], "after_last_blank_line"))
    line = text.rfind("\n")
    if line >= 0:
        starts.append((line + 1, "last_line"))
    return starts


def split_prompt(tokenizer, ids: list[int], request: SessionRequest, max_question_tokens: int) -> PromptLayout:
    """Find instruction, context and question in the prompt ids (see the module docstring)."""
    text = decode(tokenizer, ids)
    if request.messages:
        content = _last_user_text(request.messages)
        if not content or not content.strip():
            raise PolicyInputError("infiniretri needs a non-empty user message holding the context and question")
        start = text.rfind(content)
        if start < 0:
            content = content.strip()
            start = text.rfind(content)
        if start < 0:
            raise PolicyInputError("infiniretri could not find the last user message in the rendered prompt")
        r0, r1 = start, start + len(content)
    else:
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        lead = 0
        while lead < len(ids) and ids[lead] in special:
            lead += 1
        r0, r1 = len(decode(tokenizer, ids[:lead])), len(text)
    region = text[r0:r1]
    if not region.strip():
        raise PolicyInputError("infiniretri needs a question: the prompt is empty")
    c0 = token_boundary(tokenizer, ids, r0, after=True)
    query = request.query_text
    if query is not None:
        if not query.strip():
            raise PolicyInputError("kv_policy.query is empty", "kv_policy.query")
        found = region.rfind(query)
        if found < 0:  # the question is not in the prompt: read all of it, ask the query after it
            tail = max(c0, token_boundary(tokenizer, ids, r1, after=False))
            asked = list(tokenizer.encode("\n\n" + query, add_special_tokens=False))
            return PromptLayout(ids[:c0], (c0, tail), asked + ids[tail:], "query_appended")
        q = max(c0, token_boundary(tokenizer, ids, r0 + found, after=False))
        return PromptLayout(ids[:c0], (c0, q), ids[q:], "query")
    starts = _default_question_starts(region)
    if not starts:  # a single line: all question, nothing to read
        return PromptLayout(ids[:c0], (c0, c0), ids[c0:], "whole_prompt")
    r1_token = token_boundary(tokenizer, ids, r1, after=True)
    for offset, source in starts:
        q = max(c0, token_boundary(tokenizer, ids, r0 + offset, after=False))
        if r1_token - q <= max_question_tokens:
            return PromptLayout(ids[:c0], (c0, q), ids[q:], source)
    raise PolicyInputError(
        f"infiniretri found no question: the last line is longer than max_question_tokens "
        f"({max_question_tokens}); pass kv_policy.query or end the prompt with the question on its own line"
    )


def question_rows(call: AttentionCall, question_start: int, piece_rows: int = 0) -> torch.Tensor:
    """Probabilities [R, N] of the question rows (queries from `question_start` on), summed over heads.

    Rows are scored in pieces of p (p = ROW_PIECE_ELEMENTS // (Hq x N) unless `piece_rows` is given),
    so the fp32 softmax of a long question never holds all R x N x Hq scores at once.
    """
    query, key = call.query, call.key
    tq, tk = query.shape[2], key.shape[2]
    rows = piece_rows or max(1, ROW_PIECE_ELEMENTS // (query.shape[1] * tk))
    out = torch.empty(tq - question_start, tk, device=query.device)
    for start in range(question_start, tq, rows):
        stop = min(tq, start + rows)
        if call.mask is None:  # causal, bottom-right: query i sees keys <= tk - tq + i
            mask = causal_mask(tq, tk, query.device)[start:stop]
        else:
            mask = call.mask[:, :, start:stop, :]
        probs = attention_probs(query[:, :, start:stop], key, call.scaling, mask)
        out[start - question_start : stop - question_start] = probs[0].sum(0)
        del probs
    return out


def window_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """[R, L] -> [R, L]: each column replaced by the sum over columns j-window//2 .. j+(window-1)//2."""
    padded = torch.nn.functional.pad(x, (window // 2, (window - 1) // 2))
    kernel = torch.ones(1, 1, window, dtype=x.dtype, device=x.device)
    return torch.nn.functional.conv1d(padded[:, None], kernel)[:, 0]


def score_candidates(
    rows: torch.Tensor, start: int, end: int, window: int, sink_tokens: int, row_weights: torch.Tensor | None
) -> torch.Tensor:
    """Phrase scores [end-start] of candidate positions [start, end) from question rows [R, N]."""
    region = rows[:, start:end].clone()
    if sink_tokens > start:
        region[:, : sink_tokens - start] = 0.0
    smoothed = window_sum(region, window)
    if row_weights is not None:
        smoothed = smoothed * row_weights[:, None]
    return smoothed.sum(0)


def select_sentences(scores: torch.Tensor, lengths: list[int], top_k: int) -> tuple[list[int], torch.Tensor]:
    """(indices of the sentences holding a top-k token, in order; each sentence's best score)."""
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    top = scores.topk(min(top_k, scores.numel())).indices.cpu()
    best = torch.full((len(lengths),), float("-inf")).scatter_reduce(0, owner, scores.float().cpu(), "amax")
    return owner[top].unique().tolist(), best


def cap_sentences(chosen: list[int], best: torch.Tensor, lengths: list[int], limit: int) -> list[int]:
    """Keep the best-scoring chosen sentences whose total length fits `limit` (document order)."""
    if sum(lengths[i] for i in chosen) <= limit:
        return chosen
    kept, total = [], 0
    for i in sorted(chosen, key=lambda i: -float(best[i])):
        if total + lengths[i] <= limit:
            kept.append(i)
            total += lengths[i]
    return sorted(kept)


class InfiniRetriSession(PolicySession):
    params: InfiniRetriParams

    def __init__(self, policy, params, info, request):
        super().__init__(policy, params, info, request)
        self.scoring_layer = self._resolve_layer()
        self._probe: _Probe | None = None
        self._row_weights: torch.Tensor | None = None
        self._report: dict = {}
        self.retained: list[Span] = []  # token spans of the prompt kept after the last chunk
        self.piece_rows = 0  # question rows scored at once (0: sized by ROW_PIECE_ELEMENTS)

    def _resolve_layer(self) -> int:
        n = self.info.num_layers
        if self.params.layer is None:
            return round(self.params.layer_depth * (n - 1))
        layer = self.params.layer + n if self.params.layer < 0 else self.params.layer
        if not 0 <= layer < n:
            raise PolicyInputError(
                f"layer {self.params.layer} is out of range for a {n}-layer model", "kv_policy.layer"
            )
        return layer

    def next_position_ids(self, num_tokens: int) -> torch.Tensor:
        start = self.cache.get_seq_length()  # the rebuilt prompt is shorter than the tokens seen
        return torch.arange(start, start + num_tokens, device=self.info.device).unsqueeze(0)

    def attention(self, call: AttentionCall) -> torch.Tensor:
        probe = self._probe
        if probe is None or call.layer_idx != probe.layer:
            return dense_attention(call)
        probe.rows = question_rows(call, probe.question_start, self.piece_rows)
        raise _ProbeDone

    def _question_rows(self, runner, ids: list[int], question_start: int) -> torch.Tensor:
        """One scoring forward over `ids` (positions 0..N-1, throwaway cache) -> rows [R, N]."""
        probe = _Probe(self.scoring_layer, question_start)
        self._probe, self.cache = probe, DynamicCache(config=self.info.config)
        positions = torch.arange(len(ids), device=self.info.device).unsqueeze(0)
        self.counts_tokens = False  # a scoring forward reads no new request tokens
        try:
            runner.forward(self, torch.tensor([ids]), position_ids=positions)
        except _ProbeDone:
            pass
        finally:
            self._probe, self.counts_tokens = None, True
        assert probe.rows is not None, "scoring layer was not reached"
        return probe.rows

    def prefill(self, runner, input_ids: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        p = self.params
        tokenizer = self.info.tokenizer
        ids = input_ids[0].tolist()
        layout = prompt_layout(self.params, self.info, self.request, ids)
        prefix, question = layout.prefix, layout.question
        c0, c1 = layout.context
        fixed = len(prefix) + len(question)
        limit = self.info.max_context - fixed - p.chunk_tokens  # room for retained sentences
        pieces = token_pieces(tokenizer, ids[c0:c1])
        spans = [(s + c0, e + c0) for s, e in sentence_spans(pieces, 0, c1 - c0, p.chunk_tokens)]
        chunks = pack_chunks(spans, p.chunk_tokens)
        retained: list[Span] = []
        forwards = scored_tokens = 0
        for chunk in chunks:
            candidates = retained + chunk
            lengths = [e - s for s, e in candidates]
            if sum(lengths) <= p.top_k:
                retained = candidates
                continue
            seq = prefix + gather(ids, candidates) + question
            q0 = len(seq) - len(question)
            rows = self._question_rows(runner, seq, q0)
            forwards += 1
            scored_tokens += len(seq)
            if p.question_weight and self._row_weights is None:
                self._row_weights = rows[:, q0:].sum(-1) ** 2
            weights = self._row_weights if p.question_weight else None
            scores = score_candidates(rows, len(prefix), q0, p.window, p.sink_tokens, weights)
            chosen, best = select_sentences(scores, lengths, p.top_k)
            retained = [candidates[i] for i in cap_sentences(chosen, best, lengths, max(limit, 0))]
            yield
        self.retained = retained
        final = prefix + gather(ids, retained) + question
        if len(final) > self.info.max_context:  # only when there was nothing to read
            raise PolicyInputError(
                f"infiniretri found no context to read apart from a {len(final)}-token question, longer than the "
                f"model's context ({self.info.max_context}); pass kv_policy.query or put the question on its own line"
            )
        self._report = {
            "chunks_read": len(chunks),
            "scoring_forwards": forwards,
            "scoring_tokens": scored_tokens,
            "context_tokens": c1 - c0,
            "retention_ratio": round(span_length(retained) / (c1 - c0), 4) if c1 > c0 else 1.0,
            "question_tokens": len(question),
            "question_source": layout.source,
            "final_prompt_tokens": len(final),
            "scoring_layer": self.scoring_layer,
        }
        self.cache = self.make_cache()
        self.counts_tokens = False  # the rebuilt prompt is what is kept; what was read is the whole prompt
        try:
            logits = yield from super().prefill(runner, torch.tensor([final]))
        finally:
            self.counts_tokens = True
        self.tokens_seen = len(ids)
        return logits

    def stats(self):
        stats = super().stats()
        if self._report:
            stats.tokens_retained = span_length(self.retained)
        stats.extra.update(self._report)
        return stats


def prompt_layout(params: InfiniRetriParams, info, request: SessionRequest, ids: list[int]):
    """Split the prompt into instruction / context / question; raise a 400 if that fails."""
    tokenizer = info.tokenizer
    if tokenizer is None:
        raise PolicyInputError("infiniretri needs the model's tokenizer to find sentences")
    layout = split_prompt(tokenizer, ids, request, params.max_question_tokens)
    c0, c1 = layout.context
    fixed = len(layout.prefix) + len(layout.question)
    if c1 > c0 and info.max_context - fixed - params.chunk_tokens < 0:
        raise PolicyInputError(
            f"infiniretri: instruction and question take {fixed} tokens; with a {params.chunk_tokens}-token "
            f"chunk they exceed the model's context ({info.max_context})"
        )
    return layout


@register
class InfiniRetriPolicy(Policy):
    name = "infiniretri"
    paper = "2502.12962"
    Params = InfiniRetriParams
    session_class = InfiniRetriSession
    extends_context = True
    summary = "reads the context in sentence chunks, keeps sentences the question attends to"

    def check_prompt(self, params, info, request, prompt_ids: list[int]) -> None:
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
