"""InfiniRetri's retrieval step (arXiv 2502.12962): the question rows of the scoring layer, their
phrase scores over the candidate tokens, and the sentences those scores keep.

A candidate token's score is its attention from every question row, summed over heads, summed
over a centred window of `window` tokens ("phrases") and, per question row, weighted by that
row's in-question attention squared; the sentences holding the `top_k` best tokens are kept,
capped to the room the model's context leaves (lowest-scoring sentences go first).
"""

from __future__ import annotations

import torch

from kvmux.policies.base import AttentionCall
from kvmux.policies.dense import attention_probs, causal_mask

# fp32 score elements of one piece of question rows in the scoring layer (x3 copies: scores, masked, softmax)
ROW_PIECE_ELEMENTS = 1 << 22


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
