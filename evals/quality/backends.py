"""Where an eval sends its prompts: the in-process engine, or any OpenAI-compatible HTTP server.

Both take the sample's exact token ids (so the measured length is the length the model reads),
decode greedily, and pass the KV policy as kvmux's `kv_policy` field (a preset name plus
overrides, and the question as `query` for query-aware policies). A request the server refuses
(unknown preset, bad parameter, prompt longer than the context) raises `Rejected` with the
server's message; the runner records it against the cell instead of stopping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from kvmux.evals.tasks.common import Sample

if TYPE_CHECKING:
    from kvmux.models.runner import Runner
    from kvmux.policies.base import PolicySession

DEFAULT_PRESET = "default"  # the server's own default policy: no kv_policy field is sent


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


class EngineBackend:
    """Runs requests on an in-process `kvmux.server.engine.Engine`."""

    kind = "engine"

    def __init__(self, engine: Any):
        self.engine = engine
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
        started = time.perf_counter()
        try:
            result = self.engine.generate(prompt=list(sample.prompt_ids), sampling=sampling, kv_policy=kv_policy)
        except KvmuxError as exc:  # presets, policies and the engine all raise these
            raise Rejected(exc.message) from None
        return Generation(
            text=result.text,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            seconds=time.perf_counter() - started,
            kv=dict(result.kv),
        )

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
