"""The generation engine: one request's life as a step generator, plus request preparation.

The engine never calls `model.generate`: it runs the policy session's prefill (chunked, explicit
positions), samples with transformers' logits processors, feeds tokens back one by one through
the session, detokenizes incrementally and stops on EOS, stop strings, stop token ids or
max_tokens. `RequestState.steps()` yields after every prefill chunk and every token so that a
scheduler can interleave requests; `Engine.generate` drives one request to completion in the
calling thread (used by the CLI, evals and benchmarks).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kvmux.errors import RequestError
from kvmux.models.loader import LoadedModel, eos_token_ids
from kvmux.policies.base import PolicySession, SessionRequest
from kvmux.policies.presets import Preset, resolve_request_policy
from kvmux.server.detok import IncrementalDetokenizer, StopStrings
from kvmux.server.limits import AUTO, DEFAULT_MAX_QUERY_TOKENS, Auto, resolve_limits
from kvmux.server.sampling import Sampler, SamplingParams, token_logprobs


@dataclass
class GenerationRequest:
    """A validated request, ready to run."""

    prompt_ids: list[int]
    sampling: SamplingParams
    preset: Preset
    session_request: SessionRequest
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenEvent:
    """What one step produced: a text delta (maybe empty), the token, and the end if reached."""

    text: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | None while running


@dataclass
class NeedDecode:
    """Yielded by a running request: feed `token` through its session and send back the logits."""

    session: PolicySession
    token: int


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    kv: dict[str, Any]
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


class RequestState:
    """One in-flight request as a coroutine.

    `steps()` yields None after each prefill chunk, a TokenEvent per generated token, and a
    NeedDecode after each non-final token; the driver answers a NeedDecode with `send(logits)`
    (so a scheduler can run the decode forwards of several requests as one batch).
    """

    def __init__(self, engine: Engine, request: GenerationRequest):
        self.engine = engine
        self.request = request
        self.session: PolicySession | None = None
        self.completion_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.prefill_ms = 0.0
        self.decode_started = 0.0
        self.decode_seconds = 0.0
        self.finish_reason: str | None = None
        self.final_stats: dict[str, Any] = {}
        self.interrupt: Callable[[], bool] | None = None  # handed to the session (layer-boundary stops)

    def steps(self) -> Generator[TokenEvent | NeedDecode | None, torch.Tensor | None, None]:
        req, engine = self.request, self.engine
        preset = req.preset
        try:
            self.session = preset.policy.new_session(preset.params, engine.info, req.session_request)
            self.session.interrupt = self.interrupt
            started = time.perf_counter()
            ids = torch.tensor([req.prompt_ids], device=engine.info.device)
            logits = yield from self.session.prefill(engine.runner, ids)
            self.prefill_ms = (time.perf_counter() - started) * 1000
            yield from self._decode_loop(logits)
        finally:
            if self.session is not None:
                try:
                    self.final_stats = self.session.stats().as_dict()
                finally:
                    self.session.close()

    def _decode_loop(self, logits: torch.Tensor) -> Generator[TokenEvent | NeedDecode, torch.Tensor, None]:
        req, engine = self.request, self.engine
        sampling = req.sampling
        sampler = Sampler(sampling, engine.info.device)
        detok = IncrementalDetokenizer(engine.tokenizer, req.prompt_ids)
        stops = StopStrings(sampling.stop)
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else engine.eos_token_ids)
        history = torch.tensor(req.prompt_ids, device=engine.info.device)
        self.decode_started = time.perf_counter()
        while True:
            token = sampler(logits, history)
            event = TokenEvent(text="", token_id=token)
            if sampling.logprobs is not None:
                event.logprob, event.top_logprobs = token_logprobs(logits, token, sampling.logprobs)
            self.completion_ids.append(token)
            if token in stop_ids:
                event.finish_reason = "stop"
            else:
                event.text = self._append_text(detok.add(token), stops)
            if event.finish_reason is None and len(self.completion_ids) >= sampling.max_tokens:
                event.finish_reason = "length"
            if event.finish_reason is None and self.finish_reason == "stop":
                event.finish_reason = "stop"
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
                event.text += self._flush()
                self.decode_seconds = time.perf_counter() - self.decode_started
                yield event
                return
            yield event
            history = torch.cat([history, history.new_tensor([token])])
            logits = yield NeedDecode(self.session, token)

    def _append_text(self, delta: str, stops: StopStrings) -> str:
        """Add a delta, cut at a stop string, and return the text that is safe to emit now."""
        before = len(self.text)
        self.text += delta
        if stops.stops:
            hit = stops.find(self.text, before)
            if hit is not None:
                self.text = self.text[:hit]
                self.finish_reason = "stop"
                return ""
        safe = stops.safe_length(self.text)
        out = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def _flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def kv_stats(self) -> dict[str, Any]:
        preset = self.request.preset
        stats: dict[str, Any] = {"policy": preset.policy.name, "preset": preset.name}
        stats.update(self.final_stats or (self.session.stats().as_dict() if self.session else {}))
        decoded = max(len(self.completion_ids) - 1, 0)  # the first token comes from the prefill
        stats["prefill_ms"] = round(self.prefill_ms, 2)
        stats["decode_tokens_per_s"] = round(decoded / self.decode_seconds, 2) if self.decode_seconds > 0 else None
        return stats


class Engine:
    """Prepares requests (tokenize, validate, resolve the policy) and runs them."""

    def __init__(
        self,
        loaded: LoadedModel,
        presets: dict[str, Preset],
        default_preset: str = "full",
        prefill_chunk_tokens: int = 2048,
        max_prompt_tokens: int | Auto | None = None,
        max_new_tokens: int | None = None,
        kv_memory_budget_bytes: int | Auto | None = AUTO,
        max_query_tokens: int | None = DEFAULT_MAX_QUERY_TOKENS,
    ):
        if default_preset not in presets:
            raise ValueError(f"default preset '{default_preset}' is not among the presets {sorted(presets)}")
        self.loaded = loaded
        self.info = loaded.info
        self.tokenizer = loaded.tokenizer
        self.presets = presets
        self.default_preset = default_preset
        self.runner = loaded.runner(prefill_chunk_tokens)
        # `auto` settings resolved now that the model is loaded (free memory measured after its weights)
        self.limits = resolve_limits(self.info, kv_memory_budget_bytes, max_prompt_tokens, max_query_tokens)
        self.max_prompt_tokens = self.limits.max_prompt_tokens
        self.max_query_tokens = self.limits.max_query_tokens
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = _eos_ids(loaded)

    # -- preparation ---------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("This model has no chat template; use /v1/completions.", "messages")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # template errors are the client's messages being malformed
            raise RequestError(f"messages could not be rendered by the chat template: {exc}", "messages") from None

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids must be in [0, {vocab}); got {bad[:5]}", param)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def prepare(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        sampling: SamplingParams | None = None,
        kv_policy: str | dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> GenerationRequest:
        sampling = sampling or SamplingParams()
        preset, query = resolve_request_policy(kv_policy, self.presets, self.default_preset)
        query_ids = self._query_ids(query)
        if isinstance(prompt, list):  # before the per-id checks: a huge token array is refused at once
            self._check_prompt_length(len(prompt))
        if messages is not None:
            text = self.render_chat(messages)
            ids = self.tokenize(text, add_special_tokens=False)
        elif isinstance(prompt, list):
            self.check_token_ids(prompt, "prompt")
            ids, text = list(prompt), self.tokenizer.decode(prompt)
        else:
            text = prompt or ""
            ids = self.tokenize(text, add_special_tokens=True) if text else []
        if not ids:
            raise RequestError("The prompt is empty; send at least one token.", "messages" if messages else "prompt")
        self._check_lengths(ids, sampling, preset)
        session_request = SessionRequest(query_text=query, prompt_text=text, messages=messages, query_ids=query_ids)
        # a policy that cannot serve this request (e.g. no question found) says so now, as a 400
        preset.policy.check_prompt(preset.params, self.info, session_request, ids)
        return GenerationRequest(ids, sampling, preset, session_request, request_id or uuid.uuid4().hex)

    def _check_lengths(self, ids: list[int], sampling: SamplingParams, preset: Preset) -> None:
        if sampling.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {sampling.max_tokens}.", "max_tokens")
        if self.max_new_tokens is not None and sampling.max_tokens > self.max_new_tokens:
            raise RequestError(
                f"max_tokens is {sampling.max_tokens}; this server allows at most {self.max_new_tokens}.", "max_tokens"
            )
        self._check_prompt_length(len(ids))
        limit = preset.policy.context_limit(preset.params, self.info)
        if limit is not None and len(ids) + sampling.max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens for preset '{preset.name}'; the request "
                f"needs {len(ids) + sampling.max_tokens} ({len(ids)} in the prompt, {sampling.max_tokens} for "
                "the completion). Shorten the prompt, lower max_tokens, or pick a preset that extends context.",
                "prompt",
            )

    def _check_prompt_length(self, num_tokens: int) -> None:
        if self.max_prompt_tokens is not None and num_tokens > self.max_prompt_tokens:
            raise RequestError(
                f"The prompt has {num_tokens} tokens; this server accepts at most {self.max_prompt_tokens}.", "prompt"
            )

    def _query_ids(self, query: str | None) -> list[int] | None:
        """kv_policy.query as token ids (no special tokens); a 400 when longer than max_query_tokens."""
        if query is None:
            return None
        ids = self.tokenize(query, add_special_tokens=False)
        if self.max_query_tokens is not None and len(ids) > self.max_query_tokens:
            raise RequestError(
                f"kv_policy.query has {len(ids)} tokens; this server accepts at most {self.max_query_tokens} "
                "(the question alone, without the context).",
                "kv_policy.query",
            )
        return ids

    def copy_request(self, request: GenerationRequest, seed_offset: int) -> GenerationRequest:
        """Another choice of the same request (n > 1): same prompt and policy, its own seed."""
        sampling = replace(request.sampling)
        if sampling.seed is not None:
            sampling.seed += seed_offset
        return replace(request, sampling=sampling, request_id=f"{request.request_id}-{seed_offset}")

    # -- running -------------------------------------------------------------------------------
    def start(self, request: GenerationRequest) -> RequestState:
        return RequestState(self, request)

    def drive(self, state: RequestState) -> Iterator[TokenEvent]:
        """Run a request alone in this thread, yielding its token events."""
        steps = state.steps()
        reply = None
        try:
            while True:
                event = steps.send(reply)
                reply = None
                if isinstance(event, NeedDecode):
                    reply = event.session.decode(self.runner, event.token)
                elif event is not None:
                    yield event
        except StopIteration:
            return
        finally:
            steps.close()

    def generate(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        sampling: SamplingParams | None = None,
        kv_policy: str | dict[str, Any] | None = None,
    ) -> GenerationResult:
        """Run one request to completion in the calling thread."""
        request = self.prepare(prompt, messages, sampling, kv_policy)
        state = self.start(request)
        logprobs = []
        for event in self.drive(state):
            if event.logprob is not None:
                logprobs.append((event.token_id, event.logprob, event.top_logprobs or []))
        return GenerationResult(
            text=state.text,
            finish_reason=state.finish_reason or "length",
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(state.completion_ids),
            token_ids=state.completion_ids,
            kv=state.kv_stats(),
            logprobs=logprobs,
        )


def _eos_ids(loaded: LoadedModel) -> set[int]:
    return eos_token_ids(getattr(loaded.model, "generation_config", None), loaded.model.config, loaded.tokenizer)
