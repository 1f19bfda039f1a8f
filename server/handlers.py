"""Turn engine events into OpenAI-shaped responses: whole JSON bodies and SSE streams."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from kvmux.errors import KvmuxError
from kvmux.server.engine import TokenEvent
from kvmux.server.errors import to_error_body
from kvmux.server.request_handle import Handle
from kvmux.server.scheduler import Scheduler

DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The HTTP client disconnected."""


async def next_event(handle: Handle, watch: DisconnectWatch) -> tuple[str, Any]:
    """Wait for the handle's next event, cancelling the request if the client goes away."""
    while True:
        if await watch.gone():
            handle.cancel()
            raise ClientGone()
        try:
            return await asyncio.wait_for(handle.events.get(), timeout=DISCONNECT_POLL_S)
        except TimeoutError:
            continue


class DisconnectWatch:
    """Checks the client connection at most every DISCONNECT_POLL_S, however fast events arrive."""

    def __init__(self, request: Request | None):
        self.request = request
        self.checked = time.monotonic() - DISCONNECT_POLL_S  # the first call checks

    async def gone(self) -> bool:
        if self.request is None or time.monotonic() - self.checked < DISCONNECT_POLL_S:
            return False
        self.checked = time.monotonic()
        return await self.request.is_disconnected()


class Collected:
    """All events of one choice, gathered for a non-streaming response."""

    def __init__(self) -> None:
        self.text = ""
        self.finish_reason = "length"
        self.tokens: list[TokenEvent] = []
        self.kv: dict[str, Any] = {}


async def collect(handle: Handle, request: Request | None) -> Collected:
    out = Collected()
    watch = DisconnectWatch(request)
    while True:
        kind, payload = await next_event(handle, watch)
        if kind == "token":
            out.text += payload.text
            out.tokens.append(payload)
            if payload.finish_reason:
                out.finish_reason = payload.finish_reason
        elif kind == "done":
            out.kv = payload
            return out
        elif kind == "error":
            raise payload
        elif kind == "cancelled":
            raise ClientGone()


async def collect_all(handles: list[Handle], request: Request | None) -> list[Collected]:
    """Collect n choices at once; on any exit before all finish (an error, the client leaving, the
    handler's task being cancelled) every choice is cancelled, so none runs on unobserved."""
    try:
        return list(await asyncio.gather(*(collect(h, request) for h in handles)))
    finally:
        for handle in handles:
            handle.cancel()


def usage(prompt_tokens: int, completion_tokens: int, kv: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` = prompt tokens served by the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": int((kv or {}).get("cached_tokens") or 0)},
    }


def completion_logprobs(tokens: list[TokenEvent], tokenizer, offset: int = 0) -> dict[str, Any] | None:
    if not tokens or tokens[0].logprob is None:
        return None
    text_offset, offsets = offset, []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token.text)
    return {
        "tokens": [tokenizer.decode([t.token_id]) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in (t.top_logprobs or [])} for t in tokens],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list[TokenEvent], tokenizer) -> dict[str, Any] | None:
    if not tokens or tokens[0].logprob is None:
        return None
    content = []
    for t in tokens:
        text = tokenizer.decode([t.token_id])
        content.append(
            {
                "token": text,
                "logprob": t.logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": tokenizer.decode([i]), "logprob": lp, "bytes": list(tokenizer.decode([i]).encode())}
                    for i, lp in (t.top_logprobs or [])
                ],
            }
        )
    return {"content": content}


def sse(data: dict[str, Any] | str) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {body}\n\n"


async def stream_events(
    scheduler: Scheduler,
    handles: list[Handle],
    request: Request,
    chunk_for: Any,
    usage_chunk: Any,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE lines for n parallel choices: chunks in arrival order, then usage, then [DONE].

    `chunk_for(index, event, first)` builds one chunk; `usage_chunk(usage, kv)` the last one, with
    the first choice's KV stats; an error after the headers went out is sent as an error event
    followed by [DONE].
    """
    prompt_tokens = len(handles[0].request.prompt_ids)
    completion_tokens = 0
    kv: dict[str, Any] | None = None
    first = [True] * len(handles)
    pending = set(range(len(handles)))
    wake = asyncio.Event()
    for handle in handles:
        handle.wake = wake
    watch = DisconnectWatch(request)
    try:
        while pending:
            wake.clear()
            for index in sorted(pending):
                handle = handles[index]
                while index in pending and not handle.events.empty():
                    kind, payload = handle.events.get_nowait()
                    if kind == "token":
                        completion_tokens += 1
                        yield sse(chunk_for(index, payload, first[index]))
                        first[index] = False
                    elif kind == "error":
                        raise payload
                    elif kind in ("done", "cancelled"):
                        if kind == "done" and index == 0:
                            kv = payload
                        pending.discard(index)
            if pending:
                if await watch.gone():
                    raise ClientGone()
                if not any(not handles[i].events.empty() for i in pending):
                    try:  # woken by the next event; the timeout only paces the disconnect check
                        await asyncio.wait_for(wake.wait(), timeout=DISCONNECT_POLL_S)
                    except TimeoutError:
                        pass
        if include_usage:
            yield sse(usage_chunk(usage(prompt_tokens, completion_tokens, kv), kv))
    except ClientGone:
        return
    except (KvmuxError, Exception) as exc:  # noqa: BLE001 - any failure becomes an in-stream error event
        _, body = to_error_body(exc)
        yield sse(body)
    finally:
        for handle in handles:
            handle.cancel()
    yield sse("[DONE]")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
