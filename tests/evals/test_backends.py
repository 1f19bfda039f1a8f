"""The HTTP backend speaks OpenAI completions with kvmux's kv_policy and maps 400s to rejections."""

from __future__ import annotations

import json

import httpx
import pytest

from kvmux.evals.quality.backends import HTTPBackend, Rejected
from kvmux.evals.tasks import get_task
from kvmux.evals.tasks.common import Renderer


def _server(seen: list[dict]):
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "served-model"}]})
        if request.url.path == "/v1/policies":
            return httpx.Response(200, json={"data": [{"name": "sl", "policy": "streaming_llm"}]})
        body = json.loads(request.content)
        seen.append(body)
        if body.get("kv_policy", {}).get("preset") == "nope":
            error = {"message": "Unknown kv_policy preset 'nope'", "type": "BadRequestError", "param": "kv_policy"}
            return httpx.Response(400, json={"error": error})
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 2}
        return httpx.Response(
            200,
            json={
                "choices": [{"text": " 4242.", "finish_reason": "length"}],
                "usage": usage,
                "kv": {"kv_ratio": 0.5},
            },
        )

    return httpx.MockTransport(handle)


def test_http_backend_sends_ids_greedy_and_kv_policy(smol_tokenizer):
    seen: list[dict] = []
    backend = HTTPBackend("http://server:1/", smol_tokenizer, transport=_server(seen))
    sample = get_task("passkey").make(Renderer(smol_tokenizer), 512, 50.0, 0, seed=1)
    out = backend.generate(sample, {"preset": "sl", "query": sample.query})
    assert backend.model_name == "served-model" and backend.policy_name({"preset": "sl"}) == "streaming_llm"
    assert seen[0]["prompt"] == sample.prompt_ids and seen[0]["temperature"] == 0.0
    assert seen[0]["max_tokens"] == sample.max_new_tokens and seen[0]["kv_policy"]["query"] == sample.query
    assert out.text == " 4242." and out.prompt_tokens == sample.prompt_tokens and out.kv == {"kv_ratio": 0.5}
    backend.generate(sample, None)
    assert "kv_policy" not in seen[1]
    with pytest.raises(Rejected, match="Unknown kv_policy preset 'nope'"):
        backend.generate(sample, {"preset": "nope"})
    with pytest.raises(Rejected, match="in-process"):
        backend.open_session({"preset": "sl"})
