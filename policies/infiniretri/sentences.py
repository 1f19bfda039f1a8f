"""Sentences and chunks over token ids.

Used by InfiniRetri (arXiv 2502.12962), which reads a long context in chunks of whole sentences
and keeps whole sentences between chunks. Everything here works on the prompt's own token ids,
so a kept sentence is exactly the tokens the prompt had (no decode/encode round trip).

Sentence rule: a sentence ends after a token that contains a line break, or whose text ends in
`.`, `!`, `?`, `…` (optionally followed by closing quotes/brackets) when the next token starts
with whitespace (so `3.14` or `file.py` do not split); the CJK marks `。！？` end a sentence
without a following space. Whitespace-only tokens after a boundary stay with the sentence before
them. A sentence longer than the chunk size is cut into pieces of at most that many tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmux.policies.question_text import decode

Span = tuple[int, int]  # [start, end) token indices into the prompt

TERMINATORS = ".!?…。！？"
CJK_TERMINATORS = "。！？"
CLOSERS = "\"')]}»”’"


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token on its own (each distinct id is decoded once)."""
    table = {i: decode(tokenizer, [i]) for i in set(ids)}
    return [table[i] for i in ids]


def ends_sentence(piece: str, next_piece: str | None) -> bool:
    """Whether a sentence ends after the token `piece` (followed by `next_piece`, None at the end)."""
    if "\n" in piece:
        return True
    body = piece.rstrip()
    core = body.rstrip(CLOSERS)
    if not core or core[-1] not in TERMINATORS:
        return False
    if core[-1] in CJK_TERMINATORS or len(body) < len(piece):
        return True
    return next_piece is None or next_piece[:1].isspace()


def sentence_spans(pieces: Sequence[str], start: int, end: int, max_tokens: int) -> list[Span]:
    """Split tokens [start, end) into sentences; `pieces[i]` is the text of token i."""
    spans: list[Span] = []
    begin = start
    for i in range(start, end):
        nxt = pieces[i + 1] if i + 1 < end else None
        if nxt is not None and not nxt.strip():
            continue  # trailing whitespace joins the sentence it follows
        if nxt is None or ends_sentence(pieces[i], nxt):
            spans.extend(_cut(begin, i + 1, max_tokens))
            begin = i + 1
    return spans


def _cut(start: int, end: int, max_tokens: int) -> list[Span]:
    return [(s, min(s + max_tokens, end)) for s in range(start, end, max_tokens)]


def pack_chunks(spans: Sequence[Span], chunk_tokens: int) -> list[list[Span]]:
    """Greedily pack consecutive sentences into chunks of at most `chunk_tokens` tokens, no overlap."""
    chunks: list[list[Span]] = []
    current: list[Span] = []
    size = 0
    for span in spans:
        length = span[1] - span[0]
        if current and size + length > chunk_tokens:
            chunks.append(current)
            current, size = [], 0
        current.append(span)
        size += length
    if current:
        chunks.append(current)
    return chunks


def span_length(spans: Sequence[Span]) -> int:
    return sum(e - s for s, e in spans)


def gather(ids: Sequence[int], spans: Sequence[Span]) -> list[int]:
    """The token ids of `spans`, concatenated in the given order."""
    out: list[int] = []
    for s, e in spans:
        out.extend(ids[s:e])
    return out
