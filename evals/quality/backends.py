"""Where an eval sends its prompts: the in-process engine, or any OpenAI-compatible HTTP server.

Both take the sample's exact token ids (so the measured length is the length the model reads),
decode greedily, and pass the KV policy as kvmux's `kv_policy` field (a preset name plus
overrides, and the question as `query` for query-aware policies). A request the server refuses
(unknown preset, bad parameter, prompt longer than the context) raises `Rejected` with the
server's message; the runner records it against the cell instead of stopping.

The shared-context tasks send their turns through `generate_turn` (token ids, or chat messages for
scb_multiturn), which also reports the prompt tokens served by the prefix cache and the time to first
token: the in-process engine's prefill time (`kv.prefill_ms`), or over HTTP the time from sending the
request to the first streamed token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from kvmux.evals.quality.sse import StreamError, read_stream
from kvmux.evals.tasks.common import Sample

if TYPE_CHECKING:
    from kvmux.evals.tasks.shared_context import TurnPrompt
    from kvmux.models.runner import Runner
    from kvmux.policies.base import PolicySession

DEFAULT_PRESET = "default"  # the server's own default policy: no kv_policy field is sent
# --prefix-reuse: asked about a sample's context before the sample (its state is then cached)
DECOY_QUESTION = "\n\nQuestion: Which topics does the text above cover? Answer in one line.\nAnswer:"


class Rejected(Exception):
    """The backend refused the request (HTTP 400 or its in-process equivalent)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seconds: float
    kv: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] | None = None  # the completion's tokens, where the backend reports them
    ttft_ms: float | None = None  # time to first token (generate_turn)
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (generate_turn)


def without_prefix_cache(kv_policy: dict[str, Any] | None) -> dict[str, Any]:
    """The same policy selection with `cache: false`: the request neither reads nor fills the prefix cache."""
    return {**(kv_policy or {}), "cache": False}


class EngineBackend:
    """Runs requests on an in-process `kvmux.server.engine.Engine`."""

    kind = "engine"

    def __init__(self, engine: Any, warm_prefix: bool = False):
        self.engine = engine
        self.warm_prefix = warm_prefix  # ask DECOY_QUESTION about the sample's context first
        self.tokenizer = engine.tokenizer
        self.model_name = engine.info.served_name

    def _preset(self, kv_policy: dict[str, Any] | None):
        from kvmux.policies.presets import PresetError, resolve_request_policy

        try:
            return resolve_request_policy(kv_policy, self.engine.presets, self.engine.default_preset)[0]
        except PresetError as exc:
            raise Rejected(exc.message) from None

    def policy_name(self, kv_policy: dict[str, Any] | None) -> str:
        return self._preset(kv_policy).policy.name

    def context_limit(self, kv_policy: dict[str, Any] | None) -> int | None:
        """Longest prompt + completion the policy accepts (None: unbounded)."""
        preset = self._preset(kv_policy)
        return preset.policy.context_limit(preset.params, self.engine.info)

    def generate(self, sample: Sample, kv_policy: dict[str, Any] | None) -> Generation:
        from kvmux.errors import KvmuxError
        from kvmux.server.sampling import SamplingParams

        sampling = SamplingParams(max_tokens=sample.max_new_tokens, temperature=0.0)
        if not self.warm_prefix and getattr(self.engine, "prefix_cache", None) is not None:
            kv_policy = without_prefix_cache(kv_policy)  # only --prefix-reuse lets single-turn samples share
        try:
            if self.warm_prefix:
                self._ask_decoy(sample, kv_policy)
            started = time.perf_counter()
            result = self.engine.generate(prompt=list(sample.prompt_ids), sampling=sampling, kv_policy=kv_policy)
        except KvmuxError as exc:  # presets, policies and the engine all raise these
            raise Rejected(exc.message) from None
        return _generation(result, started)

    def _ask_decoy(self, sample: Sample, kv_policy: dict[str, Any] | None) -> None:
        """Another question about the same context (the prompt up to the end of its haystack), whose state
        the prefix cache keeps for the sample's own request."""
        from kvmux.server.sampling import SamplingParams

        end = sample.haystack_span[1] or len(sample.prompt) // 2
        decoy = sample.prompt[:end] + DECOY_QUESTION
        self.engine.generate(prompt=decoy, sampling=SamplingParams(max_tokens=1, temperature=0.0), kv_policy=kv_policy)

    def generate_turn(self, turn: TurnPrompt, kv_policy: dict[str, Any] | None) -> Generation:
        """One turn of a shared-context sample; TTFT = the engine's prefill time (`kv.prefill_ms`)."""
        from kvmux.errors import KvmuxError
        from kvmux.server.sampling import SamplingParams

        sampling = SamplingParams(max_tokens=turn.max_new_tokens, temperature=0.0)
        prompt = None if turn.messages is not None else list(turn.prompt_ids or [])
        started = time.perf_counter()
        try:
            result = self.engine.generate(prompt, turn.messages, sampling=sampling, kv_policy=kv_policy)
        except KvmuxError as exc:
            raise Rejected(exc.message) from None
        generation = _generation(result, started)
        generation.token_ids = list(result.token_ids)
        generation.ttft_ms = generation.kv.get("prefill_ms")
        generation.cached_tokens = int(generation.kv.get("cached_tokens") or 0)
        return generation

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix, so the next context's first turn starts cold."""
        cache = getattr(self.engine, "prefix_cache", None)
        if cache is not None:
            cache.clear()

    def open_session(self, kv_policy: dict[str, Any] | None) -> tuple[PolicySession, Runner]:
        """A fresh policy session (given `kv_policy.query` if any) and the runner, for teacher-forced
        measurements."""
        from kvmux.policies.base import SessionRequest

        preset = self._preset(kv_policy)
        query = (kv_policy or {}).get("query")
        request = SessionRequest()
        if query is not None:
            request = SessionRequest(query_text=query, query_ids=self.engine.tokenize(query, add_special_tokens=False))
        session = preset.policy.new_session(preset.params, self.engine.info, request)
        return session, self.engine.runner

    def close(self) -> None:
        pass


def _generation(result: Any, started: float) -> Generation:
    """A Generation from an engine result (`GenerationResult`) of a request started at `started`."""
    return Generation(
        text=result.text,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
        seconds=time.perf_counter() - started,
        kv=dict(result.kv),
    )


class HTTPBackend:
    """Runs requests against `POST {url}/v1/completions` of an OpenAI-compatible server."""

    kind = "http"

    def __init__(
        self,
        url: str,
        tokenizer: Any,
        model: str | None = None,
        timeout_s: float = 3600.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        base = self.url if self.url.endswith("/v1") else self.url + "/v1"
        self.client = httpx.Client(base_url=base, timeout=timeout_s, transport=transport)
        self.tokenizer = tokenizer
        self.model_name = model or self._first_model()
        self._policies: dict[str, str] | None = None

    def _first_model(self) -> str:
        response = self.client.get("/models")
        response.raise_for_status()
        models = response.json().get("data") or []
        if not models:
            raise RuntimeError(f"{self.url} serves no model (GET /v1/models is empty)")
        return str(models[0]["id"])

    def policy_name(self, kv_policy: dict[str, Any] | None) -> str:
        """The policy behind a preset, from kvmux's `GET /v1/policies` when the server has it."""
        if kv_policy is None:
            return DEFAULT_PRESET
        if self._policies is None:
            self._policies = {}
            try:
                response = self.client.get("/policies")
                if response.status_code == 200:
                    for item in response.json().get("data", []):
                        self._policies[str(item.get("name"))] = str(item.get("policy"))
            except httpx.HTTPError:
                pass
        name = str(kv_policy.get("preset"))
        return self._policies.get(name, name)

    def context_limit(self, kv_policy: dict[str, Any] | None) -> int | None:
        return None  # the server decides and answers 400 with its reason

    def generate(self, sample: Sample, kv_policy: dict[str, Any] | None) -> Generation:
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": list(sample.prompt_ids),
            "max_tokens": sample.max_new_tokens,
            "temperature": 0.0,
        }
        if kv_policy is not None:
            body["kv_policy"] = kv_policy
        started = time.perf_counter()
        response = self.client.post("/completions", json=body)
        seconds = time.perf_counter() - started
        if response.status_code == 400 or response.status_code == 422:
            raise Rejected(_error_message(response))
        if response.status_code != 200:
            raise RuntimeError(f"{self.url}: HTTP {response.status_code}: {_error_message(response)}")
        data = response.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Generation(
            text=choice.get("text") or "",
            prompt_tokens=int(usage.get("prompt_tokens", sample.prompt_tokens)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=str(choice.get("finish_reason")),
            seconds=seconds,
            kv=dict(data.get("kv") or {}),
        )

    def generate_turn(self, turn: TurnPrompt, kv_policy: dict[str, Any] | None) -> Generation:
        """One turn of a shared-context sample, streamed: `/v1/chat/completions` for messages, else
        `/v1/completions` with the token ids; TTFT = from sending the request to the first streamed token."""
        chat = turn.messages is not None
        body: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": turn.max_new_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update({"messages": turn.messages} if chat else {"prompt": list(turn.prompt_ids or [])})
        if kv_policy is not None:
            body["kv_policy"] = kv_policy
        started = time.perf_counter()
        with self.client.stream("POST", "/chat/completions" if chat else "/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                if response.status_code in (400, 422):
                    raise Rejected(_error_message(response))
                raise RuntimeError(f"{self.url}: HTTP {response.status_code}: {_error_message(response)}")
            try:
                reply = read_stream(response.iter_lines(), started, chat)
            except StreamError as exc:
                raise Rejected(exc.message) from None
        return Generation(
            text=reply.text,
            prompt_tokens=int(reply.usage.get("prompt_tokens", 0)),
            completion_tokens=int(reply.usage.get("completion_tokens", 0)),
            finish_reason=reply.finish_reason,
            seconds=reply.seconds,
            kv=reply.kv,
            ttft_ms=None if reply.ttft_s is None else round(reply.ttft_s * 1000, 2),
            cached_tokens=reply.cached_tokens,
        )

    def clear_prefix_cache(self) -> None:
        """Nothing to do: a server's prefix cache is its own (a context it has seen before may serve turn 1
        too; the turn's cached_tokens shows it)."""

    def open_session(self, kv_policy: dict[str, Any] | None):
        raise Rejected(
            "stream_ppl and decode_recall feed tokens through a policy session: they need the in-process "
            "backend (no --url)"
        )

    def close(self) -> None:
        self.client.close()


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:500]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(data)[:500]
