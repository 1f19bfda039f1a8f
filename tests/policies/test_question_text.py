"""The shared question detector: the trailing paragraph of the last user message or completion prompt."""

from __future__ import annotations

import pytest

from kvmux.policies.base import PolicyInputError, SessionRequest
from kvmux.policies.question_text import find_question, question_region
from tests.policies.helpers import ByteTokenizer

TOK = ByteTokenizer()
HEAD, TAIL = "<sys>be brief</sys>\n<user>\n", "</user>\n<assistant>\n"


class BosTokenizer(ByteTokenizer):
    """Bytes, with id 0 a special token (the completions region starts after leading ones)."""

    all_special_ids = [0]


def _chat(content: str, earlier: str = "First turn.\n\nEarlier question?") -> tuple[list[int], SessionRequest]:
    prompt = HEAD + earlier + "</user>\n<assistant>\nSure.\n<user>\n" + content + TAIL
    messages = [
        {"role": "user", "content": earlier},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": content},
    ]
    return TOK.encode(prompt), SessionRequest(prompt_text=prompt, messages=messages)


def _text(ids: list[int], span) -> str:
    return TOK.decode(ids[span.start : span.end])


def test_completion_prompt_question_is_the_paragraph_after_the_last_blank_line():
    text = "Doc line one.\nDoc line two.\n\nQuestion: which line?\nAnswer briefly."
    ids = TOK.encode(text)
    span = find_question(TOK, ids, SessionRequest(prompt_text=text), 1024)
    assert _text(ids, span) == "Question: which line?\nAnswer briefly." and span.end == len(ids)
    assert span.source == "after_last_blank_line"
    # that paragraph is over the cap: the last line
    span = find_question(TOK, ids, SessionRequest(prompt_text=text), 20)
    assert _text(ids, span) == "Answer briefly." and span.source == "last_line"
    # the last line is over the cap too: its last tokens
    span = find_question(TOK, ids, SessionRequest(prompt_text=text), 6)
    assert _text(ids, span) == "iefly." and span.source == "last_line_tail"


def test_chat_question_is_in_the_last_user_message_before_the_template_tail():
    ids, request = _chat("Intro.\nFact one. Fact two.\n\nWhat is fact two?")
    span = find_question(TOK, ids, request, 1024)
    assert _text(ids, span) == "What is fact two?" and span.source == "after_last_blank_line"
    assert TOK.decode(ids[span.end :]) == TAIL
    # a single-line last message: no question, even though an earlier turn had one
    ids, request = _chat("What is fact two?")
    assert find_question(TOK, ids, request, 1024) is None


def test_no_line_break_or_no_user_text_has_no_question():
    text = "Hello there, what is the key?"
    assert find_question(TOK, TOK.encode(text), SessionRequest(prompt_text=text), 1024) is None
    ids, request = _chat("   ")
    assert find_question(TOK, ids, request, 1024) is None
    ids = TOK.encode(HEAD + "x\ny" + TAIL)  # the message is not in the rendered prompt
    assert find_question(TOK, ids, SessionRequest(messages=[{"role": "user", "content": "a\nb"}]), 1024) is None


def test_leading_special_tokens_are_not_part_of_the_region():
    tok = BosTokenizer()
    ids = [0] + tok.encode("Context.\nQuestion?")
    region = question_region(tok, ids, SessionRequest(), "actqkv")
    assert region.content == "Context.\nQuestion?"
    span = find_question(tok, ids, SessionRequest(), 1024)
    assert tok.decode(ids[span.start : span.end]) == "Question?" and span.source == "last_line"
    with pytest.raises(PolicyInputError, match="infiniretri needs a question"):
        question_region(tok, [0] + tok.encode(" \n "), SessionRequest(), "infiniretri")
