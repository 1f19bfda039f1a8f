"""Where InfiniRetri finds instruction, context and question in a prompt (arXiv 2502.12962).

The rules (chat vs completions, `kv_policy.query` found or appended, the default question
paragraph) are in `policy.py`'s docstring, "Prompt layout"; the region searched and the default
question paragraph come from `policies/question_text.py`, which ActQKV uses too. Everything is in
the prompt's own token ids, so kept sentences are exactly the tokens the prompt had.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmux.policies.base import PolicyInputError, SessionRequest
from kvmux.policies.infiniretri.params import InfiniRetriParams
from kvmux.policies.infiniretri.sentences import Span
from kvmux.policies.question_text import question_region, token_boundary, trailing_question


@dataclass(slots=True)
class PromptLayout:
    """The prompt as instruction + context span + question (token ids of the original prompt)."""

    prefix: list[int]
    context: Span
    question: list[int]
    source: str  # how the question was found


def split_prompt(tokenizer, ids: list[int], request: SessionRequest, max_question_tokens: int) -> PromptLayout:
    """Find instruction, context and question in the prompt ids (see `policy.py`'s docstring)."""
    region = question_region(tokenizer, ids, request, "infiniretri")
    r0, r1 = region.start, region.end
    c0 = token_boundary(tokenizer, ids, r0, after=True)
    query = request.query_text
    if query is not None:
        if not query.strip():
            raise PolicyInputError("kv_policy.query is empty", "kv_policy.query")
        found = region.content.rfind(query)
        if found < 0:  # the question is not in the prompt: read all of it, ask the query after it
            tail = max(c0, token_boundary(tokenizer, ids, r1, after=False))
            asked = list(tokenizer.encode("\n\n" + query, add_special_tokens=False))
            return PromptLayout(ids[:c0], (c0, tail), asked + ids[tail:], "query_appended")
        q = max(c0, token_boundary(tokenizer, ids, r0 + found, after=False))
        return PromptLayout(ids[:c0], (c0, q), ids[q:], "query")
    span = trailing_question(tokenizer, ids, region, c0, max_question_tokens)
    if span is None:  # a single line: all question, nothing to read
        return PromptLayout(ids[:c0], (c0, c0), ids[c0:], "whole_prompt")
    if span.length <= max_question_tokens:
        return PromptLayout(ids[:c0], (c0, span.start), ids[span.start :], span.source)
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
