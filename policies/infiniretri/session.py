"""One request under InfiniRetri (arXiv 2502.12962): read the context chunk by chunk with scoring
forwards, keep the sentences the question attends to, then prefill instruction + kept sentences +
question and generate from there. The algorithm and the deviations from the reference are in
`policy.py`.

A scoring forward stops after the scoring layer by raising `_ProbeDone` from that layer's
attention; the exception is private to this module, raised only in a scoring forward (throwaway
cache, no tokens counted) and caught by the one method that started that forward.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvmux.policies.base import AttentionCall, PolicyInputError, PolicySession
from kvmux.policies.dense import dense_attention
from kvmux.policies.infiniretri.params import InfiniRetriParams
from kvmux.policies.infiniretri.prompt_layout import prompt_layout
from kvmux.policies.infiniretri.scoring import cap_sentences, question_rows, score_candidates, select_sentences
from kvmux.policies.infiniretri.sentences import Span, gather, pack_chunks, sentence_spans, span_length, token_pieces


class _ProbeDone(Exception):
    """Raised inside the scoring forward once the scoring layer's rows are captured."""


@dataclass(slots=True)
class _Probe:
    layer: int
    question_start: int
    rows: torch.Tensor | None = None  # [R, N] question rows' probabilities, summed over heads


class InfiniRetriSession(PolicySession):
    params: InfiniRetriParams

    def __init__(self, policy, params, info, request):
        super().__init__(policy, params, info, request)
        self.scoring_layer = scoring_layer(self.params, self.info)
        self._probe: _Probe | None = None
        self._row_weights: torch.Tensor | None = None
        self._report: dict = {}
        self.retained: list[Span] = []  # token spans of the prompt kept after the last chunk
        self.piece_rows = 0  # question rows scored at once (0: sized by ROW_PIECE_ELEMENTS)

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


def scoring_layer(params: InfiniRetriParams, info) -> int:
    """The layer whose attention scores the context (PolicyInputError if the model cannot give it)."""
    n = info.num_layers
    if params.layer is None:
        return round(params.layer_depth * (n - 1))
    if params.layer == "calibrated":
        if info.retrieval_heads is None:
            raise PolicyInputError(
                f"infiniretri: layer 'calibrated' needs a retrieval-head profile of {info.served_name}, and none "
                "was found for these weights; run `kvmux calibrate` for this model, or give a layer number",
                "kv_policy.layer",
            )
        return info.retrieval_heads.best_layer()
    layer = params.layer + n if params.layer < 0 else params.layer
    if not 0 <= layer < n:
        raise PolicyInputError(f"layer {params.layer} is out of range for a {n}-layer model", "kv_policy.layer")
    return layer
