"""Reading one streamed OpenAI reply (`stream: true`, server-sent events): the text, the time to its first
token, and the usage and kvmux `kv` objects of the last chunk (`stream_options.include_usage`).

Used by the HTTP eval backend for the shared-context tasks, where the time to first token is measured
by the client: from sending the request to the first chunk that carries a choice (kvmux sends one
chunk per generated token, so that is the first token).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class StreamError(Exception):
    """The server sent an error event after the stream had started."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class StreamedReply:
    text: str
    finish_reason: str
    ttft_s: float | None  # None when no token arrived
    seconds: float
    usage: dict[str, Any] = field(default_factory=dict)
    kv: dict[str, Any] = field(default_factory=dict)

    @property
    def cached_tokens(self) -> int:
        details = self.usage.get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or self.kv.get("cached_tokens") or 0)


def read_stream(lines: Iterable[str], started: float, chat: bool) -> StreamedReply:
    """Collect a completion (`chat` false: choices[].text) or chat (choices[].delta.content) stream;
    `started` is the `time.perf_counter()` at which the request was sent."""
    parts: list[str] = []
    first: float | None = None
    finish = "length"
    usage: dict[str, Any] = {}
    kv: dict[str, Any] = {}
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            break
        event = json.loads(payload)
        error = event.get("error")
        if error:
            raise StreamError(str(error.get("message") if isinstance(error, dict) else error))
        for choice in event.get("choices") or []:
            if first is None:
                first = time.perf_counter()
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            parts.append(piece or "")
            if choice.get("finish_reason"):
                finish = str(choice["finish_reason"])
        usage = event.get("usage") or usage
        kv = event.get("kv") or kv
    ended = time.perf_counter()
    return StreamedReply(
        text="".join(parts),
        finish_reason=finish,
        ttft_s=None if first is None else first - started,
        seconds=ended - started,
        usage=dict(usage),
        kv=dict(kv),
    )
