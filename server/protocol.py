"""OpenAI-compatible request models (completions, chat) with kvmux's extension fields.

Fields follow the OpenAI API order, then the vLLM-style sampling extras, then kvmux's own
(`kv_policy`). Unknown top-level fields are accepted and logged (as vLLM does); every known field
is validated so a bad value is a 400 naming the field. Sizes that would cost the server per
generated token are bounded: at most MAX_STOP_STRINGS stop strings of at most MAX_STOP_LENGTH
characters, at most MAX_STOP_TOKEN_IDS stop token ids; `seed` is a signed 64-bit integer.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kvmux.errors import RequestError
from kvmux.server.sampling import SamplingParams

log = logging.getLogger("kvmux.server")

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGGED_FIELDS = 10
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # seed + n - 1 stays within what torch.Generator accepts


def invalid(message: str, param: str | None = None) -> PydanticCustomError:
    """A validation error whose message is shown as is (a full sentence) and names `param`."""
    return PydanticCustomError("kvmux_invalid", "{message}", {"message": message, "param": param})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """Fields shared by completions and chat."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, description="tokens to generate (default 16)")
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(
        None, description=f"up to {MAX_STOP_STRINGS} strings of up to {MAX_STOP_LENGTH} characters"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    # -- vLLM / SGLang sampling extras --
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    # -- kvmux extensions --
    kv_policy: str | dict[str, Any] | None = Field(
        None,
        description="preset name, or {'preset': name, <param>: value, 'query': text, 'cache': false (no prefix cache)}",
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid(f"stop: at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}.", "stop")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise invalid(f"stop: each stop string may have at most {MAX_STOP_LENGTH} characters.", "stop")
        return stop

    @field_validator("kv_policy")
    @classmethod
    def _check_kv_policy(cls, spec: str | dict[str, Any] | None):
        if isinstance(spec, dict):
            if "preset" in spec and not isinstance(spec["preset"], str):
                raise invalid("kv_policy.preset must be a preset name (a string).", "kv_policy.preset")
            if spec.get("query") is not None and not isinstance(spec["query"], str):
                raise invalid("kv_policy.query must be a string or null.", "kv_policy.query")
            if "cache" in spec and not isinstance(spec["cache"], bool):
                raise invalid("kv_policy.cache must be true or false.", "kv_policy.cache")
        return spec

    @model_validator(mode="after")
    def _log_ignored_fields(self):
        if self.model_extra:  # a bounded line, however many (and however long) the names
            names = sorted(self.model_extra)
            shown = [name[:64] for name in names[:MAX_LOGGED_FIELDS]]
            more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
            log.info("ignoring unknown request fields: %s%s", shown, more)
        return self

    def _logprobs(self) -> int | None:
        return None

    def _max_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def to_sampling(self) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise RequestError(f"{name} is not supported; use repetition_penalty instead.", name)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self._max_tokens(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=self._logprobs(),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] = Field(..., description="text, a list with one text, or token ids")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_prompt(self):
        if self.echo:
            raise invalid("echo is not supported.", "echo")
        if self.suffix:
            raise invalid("suffix is not supported.", "suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise invalid("Send one prompt per request (a list of several prompts is not supported).", "prompt")
        return self

    def prompt_input(self) -> str | list[int]:
        if isinstance(self.prompt, list):
            if not self.prompt:
                return ""
            return self.prompt[0] if isinstance(self.prompt[0], str) else list(self.prompt)
        return self.prompt

    def _logprobs(self) -> int | None:
        return self.logprobs


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template expects them ('developer' is OpenAI's newer name for 'system')."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def _max_tokens(self) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super()._max_tokens()

    def _logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs: true.", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict[str, str]]:
        return message_dicts(self.messages)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]
