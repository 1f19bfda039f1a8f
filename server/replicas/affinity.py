"""The cache-affinity key of one HTTP request: which requests should meet on the same replica.

Requests that continue one document or one conversation share a prompt prefix, and a replica's
prefix cache can only reuse a prefix it has seen. The key is, in order:

- `X-Session-Id` (a client pins a conversation to one replica);
- else a hash of the prompt's first block: the first `prefix_chars` characters of a completion
  prompt, or of the chat messages up to and including the first user message (role and text),
  together with the request's `kv_policy` (cached states are only shared within one policy).
  Six questions asked in the user turn after one document in the system turn, or in one user
  turn after the same long document, share the block; a growing chat keeps its first turns, so
  it keeps its key.
- else None: the request carries nothing to be affine to (Serve's load-aware choice).

Nothing here knows how the cache works: the key depends only on what the client sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

SESSION_HEADER = "x-session-id"
CHARS_PER_TOKEN = 4  # a token-id prompt's block: prefix_chars / 4 token ids
Affinity = Literal["prompt", "session", "off"]


def affinity_key(headers: Mapping[str, str], body: bytes, mode: Affinity, prefix_chars: int) -> str | None:
    """The routing key of a request (None: route by load). Keys are namespaced by their source."""
    if mode == "off":
        return None
    session = headers.get(SESSION_HEADER, "").strip()
    if session:
        return "session:" + session
    if mode == "session":
        return None
    block = prompt_block(body, prefix_chars)
    if block is None:
        return None
    return "prompt:" + hashlib.blake2b(block.encode("utf-8", "replace"), digest_size=16).hexdigest()


def prompt_block(body: bytes, prefix_chars: int) -> str | None:
    """The text hashed for a JSON request body: its policy and the first block of its prompt."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    messages = data.get("messages")
    text = leading_messages(messages, prefix_chars) if isinstance(messages, list) else None
    if text is None:
        text = prompt_text(data.get("prompt"), prefix_chars)
    if not text:
        return None
    policy = json.dumps(data.get("kv_policy"), sort_keys=True, default=str)
    return f"{policy}\n{text[:prefix_chars]}"


def leading_messages(messages: list[Any], prefix_chars: int) -> str:
    """Role and text of the messages up to and including the first user message (at most prefix_chars)."""
    text = ""
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = str(message.get("role", ""))
        text += f"{role}: {content_text(message.get('content'))}\n"
        if role == "user" or len(text) >= prefix_chars:
            break
    return text[:prefix_chars]


def content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def prompt_text(prompt: Any, prefix_chars: int) -> str | None:
    """A completion prompt's first block: text, or token ids; of a batch, its first prompt."""
    if isinstance(prompt, str):
        return prompt[:prefix_chars]
    if not isinstance(prompt, list) or not prompt:
        return None
    first = prompt[0]
    if isinstance(first, (str, list)):
        return prompt_text(first, prefix_chars)
    ids = prompt[: max(1, prefix_chars // CHARS_PER_TOKEN)]
    if all(isinstance(t, int) for t in ids):
        return "ids:" + ",".join(str(t) for t in ids)
    return None
