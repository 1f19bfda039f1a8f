"""ActQKV's question vector (arXiv 2502.13542; deviations: `policy.py`).

Where the question comes from (`question_ids`, parameter `question`): `kv_policy.query` when the
request gives it; under `auto` (the default) otherwise the prompt's trailing paragraph, found by
the shared detector (`policies/question_text.py`: the text after the last blank line of the last
user message or completion prompt, or after its last line break; at most its last
`max_question_tokens` tokens); `query` reads `kv_policy.query` only; `off` builds no question.

The question is run alone (positions 0..n-1) before the prompt; per layer and query head, the
`repr_topk` question queries that received the most attention, rotated to the probe's position
`n_local`, are averaged into the question vector that joins block retrieval while the prompt is
read. The question's causal attention over itself is computed in pieces of query rows, each
against the keys up to its last row (at most `QUESTION_PIECE_ELEMENTS` fp32 scores per piece), and
the attention each key received is summed over the pieces: the same result up to float rounding,
in O(piece x n) memory instead of three n x n copies per head.
"""

from __future__ import annotations

import torch

from kvmux.policies.actqkv.context_memory import top_attended_mean
from kvmux.policies.actqkv.grouped_attention import grouped_probs, weighted_values
from kvmux.policies.actqkv.params import ActQKVParams
from kvmux.policies.base import PolicyInputError, SessionRequest
from kvmux.policies.question_text import find_question
from kvmux.policies.rope import rotate

# fp32 score elements of one piece of question rows (x3 copies: logits, masked, softmax): 16 MB each
QUESTION_PIECE_ELEMENTS = 1 << 22


def question_tokens_bound(params: ActQKVParams, num_tokens: int, query_tokens: int) -> int:
    """Most question tokens a request of `num_tokens` tokens runs (`query_tokens`: kv_policy.query's)."""
    if params.question == "off" or params.question_weight <= 0:
        return 0
    if query_tokens or params.question == "query":
        return query_tokens
    return min(num_tokens, params.max_question_tokens)  # auto: a paragraph of the prompt


def question_ids(
    params: ActQKVParams, request: SessionRequest, tokenizer, prompt_ids: list[int]
) -> tuple[list[int], str] | None:
    """The question's token ids and their source ("query", or the detector's rule), None for no question."""
    if params.question == "off" or params.question_weight <= 0:
        return None
    if request.query_text:
        ids = request.query_ids  # tokenized (and its length checked) when the request was prepared
        if ids is None:
            if tokenizer is None:
                raise PolicyInputError("actqkv: kv_policy.query needs the model's tokenizer", param="kv_policy.query")
            ids = tokenizer.encode(request.query_text, add_special_tokens=False)
        return (list(ids), "query") if ids else None
    if params.question == "query" or tokenizer is None:
        return None
    span = find_question(tokenizer, prompt_ids, request, params.max_question_tokens)
    return (prompt_ids[span.start : span.end], span.source) if span is not None else None


def question_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    inv_freq: torch.Tensor,
    n_local: int,
    repr_topk: int,
    piece_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the question (un-rotated q [Hq, n, D], k and v [Hkv, n, D]) over itself.

    Returns the output [Hq, n, D] and the question vector [Hq*D]. A piece of p rows scores its
    queries against the keys up to its last row (p = QUESTION_PIECE_ELEMENTS // (Hq x n) unless
    `piece_rows` is given).
    """
    hq, n = q.shape[0], q.shape[1]
    dev = q.device
    pos = torch.arange(n, device=dev)
    q_rot, k_rot = rotate(q, pos, inv_freq), rotate(k, pos, inv_freq)
    rows = piece_rows or max(1, QUESTION_PIECE_ELEMENTS // (hq * n))
    received = torch.zeros(hq, n, device=dev)  # attention each question key received, per query head
    outs = []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        causal = torch.arange(stop, device=dev)[None, :] <= torch.arange(start, stop, device=dev)[:, None]
        probs = grouped_probs(q_rot[:, start:stop], k_rot[:, :stop], scaling, causal)  # [Hkv, g, p, stop]
        received[:, :stop] += probs.sum(dim=2).reshape(hq, stop)
        outs.append(weighted_values(probs, v[:, :stop]))
        del probs
    probe_q = rotate(q, torch.full((n,), n_local, device=dev), inv_freq)
    question = top_attended_mean(probe_q, received, repr_topk).reshape(-1)
    return torch.cat(outs, dim=1), question
