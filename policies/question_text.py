"""Where the question sits in a prompt that does not name it, in the prompt's own token ids.

Query-aware policies (InfiniRetri, ActQKV) take the question from `kv_policy.query` when a request
gives it; otherwise they look for it here. The text searched ("the region") is the last user
message as the chat template rendered it (chat), or the whole prompt after its leading special
tokens such as BOS (completions). The question is the region's trailing paragraph: the text after
its last blank line, or after its last line break when that paragraph is longer than the caller's
cap. A region without a line break has no question of its own.

Character offsets map to token indices through `token_boundary`, so a question span is exactly
tokens the prompt had (no decode/encode round trip).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from kvmux.policies.base import PolicyInputError, SessionRequest


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The exact text of `ids` (special tokens kept, no clean-up)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_boundary(tokenizer, ids: Sequence[int], char_pos: int, after: bool) -> int:
    """A token index j such that the text of ids[:j] ends at `char_pos`, or the nearest one.

    after=True: the first boundary at or after `char_pos` (a token straddling it goes before);
    after=False: the last boundary at or before it (a straddling token goes after).
    """
    lo, hi = 0, len(ids)
    if after:  # smallest j with len(text(ids[:j])) >= char_pos
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(tokenizer, ids[:mid])) >= char_pos:
                hi = mid
            else:
                lo = mid + 1
        return lo
    while lo < hi:  # largest j with len(text(ids[:j])) <= char_pos
        mid = (lo + hi + 1) // 2
        if len(decode(tokenizer, ids[:mid])) <= char_pos:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True, slots=True)
class TextRegion:
    """The characters [start, end) of the decoded prompt `text` that hold the context and question."""

    text: str
    start: int
    end: int

    @property
    def content(self) -> str:
        return self.text[self.start : self.end]


@dataclass(frozen=True, slots=True)
class QuestionSpan:
    """Prompt tokens [start, end) of the question; `source` says which rule found it."""

    start: int
    end: int
    source: str  # "after_last_blank_line", "last_line", or "last_line_tail" (its last tokens, `find_question`)

    @property
    def length(self) -> int:
        return self.end - self.start


def last_user_text(messages: list[dict]) -> str | None:
    """The text of the last user message (OpenAI content parts joined), None if it has none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else None
    return None


def question_region(tokenizer, ids: list[int], request: SessionRequest, policy: str) -> TextRegion:
    """The region of the prompt the question is looked for in; a PolicyInputError naming `policy` when
    there is none (no user text, the message not found in the rendered prompt, an empty prompt)."""
    text = decode(tokenizer, ids)
    if request.messages:
        content = last_user_text(request.messages)
        if not content or not content.strip():
            raise PolicyInputError(f"{policy} needs a non-empty user message holding the context and question")
        start = text.rfind(content)
        if start < 0:
            content = content.strip()
            start = text.rfind(content)
        if start < 0:
            raise PolicyInputError(f"{policy} could not find the last user message in the rendered prompt")
        region = TextRegion(text, start, start + len(content))
    else:
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        lead = 0
        while lead < len(ids) and ids[lead] in special:
            lead += 1
        region = TextRegion(text, len(decode(tokenizer, ids[:lead])), len(text))
    if not region.content.strip():
        raise PolicyInputError(f"{policy} needs a question: the prompt is empty")
    return region


def paragraph_starts(content: str) -> list[tuple[int, str]]:
    """Candidate question starts in `content` (character offsets), longest question first."""
    text = content.rstrip()
    starts = []
    blank = [m.end() for m in re.finditer(r"\n[ \t]*\n", text)]
    if blank:
        starts.append((blank[-1], "after_last_blank_line"))
    line = text.rfind("\n")
    if line >= 0:
        starts.append((line + 1, "last_line"))
    return starts


def trailing_question(
    tokenizer, ids: list[int], region: TextRegion, first_token: int, max_tokens: int
) -> QuestionSpan | None:
    """The region's trailing paragraph as prompt tokens, starting at or after `first_token`.

    The first candidate of `paragraph_starts` of at most `max_tokens` tokens; when none is that
    short, the last line (longer than `max_tokens`: the caller refuses or shortens it). None when
    the region has no line break. The span ends where the region ends (for chat, before the
    template's closing tokens)."""
    starts = paragraph_starts(region.content)
    if not starts:
        return None
    end = token_boundary(tokenizer, ids, region.end, after=True)
    span = None
    for offset, source in starts:
        start = max(first_token, token_boundary(tokenizer, ids, region.start + offset, after=False))
        span = QuestionSpan(start, end, source)
        if span.length <= max_tokens:
            break
    return span


def find_question(tokenizer, ids: list[int], request: SessionRequest, max_tokens: int) -> QuestionSpan | None:
    """The question of a prompt without `kv_policy.query` (the last `max_tokens` tokens of its trailing
    paragraph), or None when it has none: no user text or no line break in the region."""
    try:
        region = question_region(tokenizer, ids, request, "the question detector")
    except PolicyInputError:
        return None
    first = token_boundary(tokenizer, ids, region.start, after=True)
    span = trailing_question(tokenizer, ids, region, first, max_tokens)
    if span is None or span.length <= 0:
        return None
    if span.length > max_tokens:
        return QuestionSpan(span.end - max_tokens, span.end, "last_line_tail")
    return span
