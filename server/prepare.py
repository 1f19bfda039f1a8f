"""Request preparation: tokenize (or render the chat template), validate lengths and options, resolve
the KV policy and let it check the prompt, so a request is refused with a 400 before it is queued."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from kvmux.errors import RequestError
from kvmux.policies.base import SessionRequest
from kvmux.policies.presets import Preset, resolve_request_policy
from kvmux.server.sampling import SamplingParams


@dataclass
class GenerationRequest:
    """A validated request, ready to run."""

    prompt_ids: list[int]
    sampling: SamplingParams
    preset: Preset
    session_request: SessionRequest
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    use_prefix_cache: bool = True  # kv_policy.cache: false opts one request out


class RequestPreparation:
    """The preparation half of `Engine` (it sets tokenizer, info, presets, default_preset and the limits)."""

    tokenizer: Any
    info: Any
    presets: dict[str, Preset]
    default_preset: str
    max_prompt_tokens: int | None
    max_query_tokens: int | None
    max_new_tokens: int | None

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
        kv_policy, use_cache = _cache_option(kv_policy)
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
        return GenerationRequest(ids, sampling, preset, session_request, request_id or uuid.uuid4().hex, use_cache)

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


def _cache_option(kv_policy: str | dict[str, Any] | None) -> tuple[str | dict[str, Any] | None, bool]:
    """Split `kv_policy.cache` (use the prefix cache; default true) from the policy selection."""
    if not isinstance(kv_policy, dict) or "cache" not in kv_policy:
        return kv_policy, True
    rest = {k: v for k, v in kv_policy.items() if k != "cache"}
    use = kv_policy["cache"]
    if not isinstance(use, bool):
        raise RequestError(f"kv_policy.cache must be true or false, got {use!r}", "kv_policy.cache")
    return rest or None, use
