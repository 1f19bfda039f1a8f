"""The generation engine: one request's life as a step generator (requests are prepared in `prepare.py`).

The engine never calls `model.generate`: it runs the policy session's prefill (chunked, explicit
positions), samples with transformers' logits processors, feeds tokens back one by one through
the session, detokenizes incrementally and stops on EOS, stop strings, stop token ids or
max_tokens. `RequestState.steps()` yields after every prefill chunk and every token so that a
scheduler can interleave requests; `Engine.generate` drives one request to completion in the
calling thread (used by the CLI, evals and benchmarks). A request whose prompt extends a cached
prefix starts from the cached session state (`prefix_prefill.py`, `prefix_cache.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmux.models.loader import LoadedModel, eos_token_ids
from kvmux.policies.base import PolicySession
from kvmux.policies.presets import Preset
from kvmux.server.detok import IncrementalDetokenizer, StopStrings
from kvmux.server.limits import AUTO, DEFAULT_MAX_QUERY_TOKENS, Auto, resolve_limits
from kvmux.server.prefix_cache import PrefixCache, resolve_prefix_cache_bytes
from kvmux.server.prefix_prefill import plan_prefix, prefill_with_prefix
from kvmux.server.prepare import GenerationRequest, RequestPreparation
from kvmux.server.sampling import Sampler, SamplingParams, token_logprobs


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
        self.cached_tokens = 0  # prompt tokens restored from the prefix cache
        self.final_stats: dict[str, Any] = {}
        self.interrupt: Callable[[], bool] | None = None  # handed to the session (layer-boundary stops)

    def steps(self) -> Generator[TokenEvent | NeedDecode | None, torch.Tensor | None, None]:
        req, engine = self.request, self.engine
        preset = req.preset
        try:
            self.session = preset.policy.new_session(preset.params, engine.info, req.session_request)
            self.session.interrupt = self.interrupt
            started = time.perf_counter()
            cache = engine.prefix_cache if req.use_prefix_cache else None
            plan = plan_prefix(cache, self.session, preset, engine.runner, req.prompt_ids)
            self.cached_tokens = plan.start if plan is not None else 0
            logits = yield from prefill_with_prefix(self.session, engine.runner, req.prompt_ids, plan, cache)
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
        stats["cached_tokens"] = self.cached_tokens
        stats["prefill_ms"] = round(self.prefill_ms, 2)
        stats["decode_tokens_per_s"] = round(decoded / self.decode_seconds, 2) if self.decode_seconds > 0 else None
        return stats


class Engine(RequestPreparation):
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
        prefix_cache_bytes: int | Auto | None = None,
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
        # None or 0: off (the CLI's evals and benchmarks); the server's default is `auto`
        capacity = resolve_prefix_cache_bytes(prefix_cache_bytes, self.limits.kv_memory_budget_bytes)
        self.prefix_cache = PrefixCache(capacity) if capacity else None

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
