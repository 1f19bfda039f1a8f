"""The FastAPI application: OpenAI-compatible routes, kvmux's policy listing, errors in OpenAI shape.

The POST routes take typed pydantic bodies (so /openapi.json documents them); every validation
or parse failure is a 400 in the OpenAI error shape naming the field. Tokenizing and the other
CPU work of a request run in the state's worker pool, off the event loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvmux.errors import KvmuxError, ModelNotServedError, OverloadedError, UnavailableError
from kvmux.server.arena import install_arena_routes
from kvmux.server.engine import Engine, TokenEvent
from kvmux.server.errors import error_body, to_error_body
from kvmux.server.handlers import (
    ClientGone,
    Collected,
    chat_logprobs,
    collect_all,
    completion_logprobs,
    new_id,
    stream_events,
    usage,
)
from kvmux.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIRequest,
    TokenizeRequest,
    message_dicts,
)
from kvmux.server.state import ServerState

log = logging.getLogger("kvmux.server")


NOT_JSON = "The request body is not valid JSON."
NOT_AN_OBJECT = "The request body must be a JSON object (sent with 'Content-Type: application/json')."
# FastAPI's answer when reading or decoding a body fails other than by a JSON syntax error
# (invalid UTF-8, an integer past Python's digit limit, nesting past the recursion limit)
BODY_PARSE_FAILED = "There was an error parsing the body"
NOT_READABLE = (
    "The request body is not valid JSON, or exceeds what the server parses "
    "(UTF-8 only, integers of at most 4300 digits, nesting of at most a few hundred levels)."
)
ERROR_KINDS = {401: "AuthenticationError", 404: "NotFoundError", 408: "TimeoutError", 413: "BadRequestError"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return NOT_JSON, None
    if not loc:  # the body as a whole: missing, not an object, not JSON-typed
        return NOT_AN_OBJECT, None
    ctx = first.get("ctx") or {}
    if first.get("type") == "kvmux_invalid":  # a sentence that names its field already
        return first["msg"], ctx.get("param") or ".".join(loc)
    field = ".".join(loc)
    return f"{field}: {first['msg']}", field


def error_response(exc: BaseException) -> JSONResponse:
    status, body = to_error_body(exc)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_workers()
        state.scheduler.start()
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            state.scheduler.shutdown(state.config.shutdown_grace_s)
            state.stop_workers()

    # strict_content_type=False: a JSON body without a Content-Type header is still read as JSON
    app = FastAPI(title="kvmux", version="0.1.0", lifespan=lifespan, strict_content_type=False)
    app.state.kvmux = state
    state.install_middleware(app)

    # one place renders errors: kvmux's own (4xx/5xx with param), a client that left (499);
    # anything else escapes to the request middleware, which logs it and answers a generic 500
    @app.exception_handler(KvmuxError)
    async def _kvmux(_: Request, exc: KvmuxError):
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone):
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, field = _validation_message(exc)
        return JSONResponse(error_body(message, "BadRequestError", 400, field), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = NOT_READABLE if status == 400 and exc.detail == BODY_PARSE_FAILED else str(exc.detail)
        return JSONResponse(error_body(message, ERROR_KINDS.get(status, "BadRequestError"), status), status_code=status)

    @app.get("/health")
    async def health():
        if not state.ready or not state.scheduler.alive:
            message = "The engine cannot serve requests (starting, stopping, or its worker stopped)."
            return JSONResponse(error_body(message, "ServiceUnavailableError", 503), status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        info = state.engine.info
        card = {
            "id": info.served_name,
            "object": "model",
            "created": state.started,
            "owned_by": "kvmux",
            "root": info.served_name,  # never the model's location on disk
            "parent": None,
            "max_model_len": info.max_context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/v1/policies")
    async def policies():
        return {
            "object": "list",
            "default": state.engine.default_preset,
            "data": [p.as_dict() for p in state.engine.presets.values()],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await run_completion(state, req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await run_chat(state, req, request)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(state.engine, req.model)
        # a million token ids take a second to encode as JSON: that too happens off the event loop
        return Response(await state.off_loop(tokenize_body, state.engine, req), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(state.engine, req.model)
        return {"prompt": await state.off_loop(detokenize_request, state.engine, req)}

    state.install_extra_routes(app)
    install_arena_routes(app)
    return app


def check_model(engine: Engine, model: str | None) -> None:
    if model is not None and model != engine.info.served_name:
        raise ModelNotServedError(
            f"The model '{model}' does not exist; this server serves '{engine.info.served_name}'.", "model"
        )


def tokenize_body(engine: Engine, req: TokenizeRequest) -> bytes:
    """The /tokenize response, as JSON bytes."""
    if req.messages is not None:
        tokens = engine.tokenize(engine.render_chat(message_dicts(req.messages)), add_special_tokens=False)
    else:
        tokens = engine.tokenize(req.prompt or "", add_special_tokens=req.add_special_tokens)
    return json.dumps({"count": len(tokens), "max_model_len": engine.info.max_context, "tokens": tokens}).encode()


def detokenize_request(engine: Engine, req: DetokenizeRequest) -> str:
    engine.check_token_ids(req.tokens, "tokens")
    return engine.tokenizer.decode(req.tokens)


def submit_all(state: ServerState, req: OpenAIRequest, prepared) -> list:
    """Submit n copies of a prepared request (seeds offset so choices differ when sampling).

    If one copy is refused (queue full, no KV memory) the copies already queued are cancelled.
    """
    handles = []
    try:
        for i in range(req.n):
            copy = prepared if i == 0 else state.engine.copy_request(prepared, seed_offset=i)
            handles.append(state.scheduler.submit(copy, state.config.request_timeout_s))
    except (OverloadedError, UnavailableError) as exc:
        for handle in handles:
            handle.cancel()
        if state.metrics is not None:
            cause = "queue_full" if exc.status == 429 else "unavailable"
            state.metrics.record_rejected(cause, prepared.preset.policy.name)
        raise
    return handles


@dataclass(frozen=True)
class ResponseShape:
    """How one endpoint names its objects and renders a streamed delta or a finished choice."""

    id_prefix: str
    object_name: str
    chunk_object: str
    delta: Callable[[TokenEvent, bool, Any], dict[str, Any]]  # (event, first, tokenizer) -> choice fields
    final: Callable[[Collected, Any], dict[str, Any]]  # (result, tokenizer) -> choice fields


COMPLETION = ResponseShape(
    id_prefix="cmpl",
    object_name="text_completion",
    chunk_object="text_completion",
    delta=lambda e, first, tok: {"text": e.text, "logprobs": completion_logprobs([e], tok)},
    final=lambda r, tok: {"text": r.text, "logprobs": completion_logprobs(r.tokens, tok)},
)

CHAT = ResponseShape(
    id_prefix="chatcmpl",
    object_name="chat.completion",
    chunk_object="chat.completion.chunk",
    delta=lambda e, first, tok: {
        "delta": {"content": e.text, **({"role": "assistant"} if first else {})},
        "logprobs": chat_logprobs([e], tok),
    },
    final=lambda r, tok: {
        "message": {"role": "assistant", "content": r.text},
        "logprobs": chat_logprobs(r.tokens, tok),
    },
)


async def run_completion(state: ServerState, req: CompletionRequest, request: Request):
    check_model(state.engine, req.model)
    prepared = await state.off_loop(
        state.engine.prepare, prompt=req.prompt_input(), sampling=req.to_sampling(), kv_policy=req.kv_policy
    )
    return await respond(state, req, request, prepared, COMPLETION)


async def run_chat(state: ServerState, req: ChatCompletionRequest, request: Request):
    check_model(state.engine, req.model)
    prepared = await state.off_loop(
        state.engine.prepare, messages=req.message_dicts(), sampling=req.to_sampling(), kv_policy=req.kv_policy
    )
    return await respond(state, req, request, prepared, CHAT)


async def respond(state: ServerState, req: OpenAIRequest, request: Request, prepared, shape: ResponseShape):
    """Run the n choices of a prepared request; an SSE stream or one JSON body in `shape`."""
    tokenizer = state.engine.tokenizer
    handles = submit_all(state, req, prepared)
    head = {"id": new_id(shape.id_prefix), "created": int(time.time()), "model": state.engine.info.served_name}

    if req.stream:

        def chunk(index: int, event: TokenEvent, first: bool) -> dict[str, Any]:
            choice = {"index": index, **shape.delta(event, first, tokenizer), "finish_reason": event.finish_reason}
            return {**head, "object": shape.chunk_object, "choices": [choice]}

        def usage_chunk(u: dict[str, Any], kv: dict[str, Any] | None) -> dict[str, Any]:
            # the first choice's KV stats, as in a whole response (the arena page reads them here)
            return {**head, "object": shape.chunk_object, "choices": [], "usage": u, **({"kv": kv} if kv else {})}

        body = stream_events(state.scheduler, handles, request, chunk, usage_chunk, req.include_usage)
        return StreamingResponse(body, media_type="text/event-stream")

    results = await collect_all(handles, request)
    choices = [
        {"index": i, **shape.final(r, tokenizer), "finish_reason": r.finish_reason} for i, r in enumerate(results)
    ]
    return {
        **head,
        "object": shape.object_name,
        "choices": choices,
        "usage": usage(len(prepared.prompt_ids), sum(len(r.tokens) for r in results), results[0].kv),
        "kv": results[0].kv,
    }
