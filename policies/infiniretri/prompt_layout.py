"""Where InfiniRetri finds instruction, context and question in a prompt (arXiv 2502.12962).

The rules (chat vs completions, `kv_policy.query` found or appended, the default question
paragraph) are in `policy.py`'s docstring, "Prompt layout". Everything is in the prompt's own
token ids, so kept sentences are exactly the tokens the prompt had.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmux.policies.base import PolicyInputError, SessionRequest
from kvmux.policies.infiniretri.params import InfiniRetriParams
from kvmux.policies.infiniretri.sentences import Span, decode, token_boundary


@dataclass(slots=True)
class PromptLayout:
    """The prompt as instruction + context span + question (token ids of the original prompt)."""

    prefix: list[int]
    context: Span
    question: list[int]
    source: str  # how the question was found


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
    """Find instruction, context and question in the prompt ids (see `policy.py`'s docstring)."""
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


def prompt_layout(params: InfiniRetriParams, info, request: SessionRequest, ids: list[int]) -> PromptLayout:
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
