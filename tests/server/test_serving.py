"""Serving features over real HTTP on a tiny model: auth, request ids, limits, logprobs, n, async
client, tokenize, disconnects cancelling work, deadlines."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from kvmux.server.config import ServerConfig
from kvmux.server.serve import create_app
from tests.server.conftest import LiveServer, free_port
from tests.tiny_models import tiny_engine

KEY = "test-key"


@pytest.fixture(scope="module")
def server():
    engine = tiny_engine(prefill_chunk_tokens=16, max_new_tokens=4000)
    config = ServerConfig(api_keys=[KEY], max_request_body_bytes=4096, request_timeout_s=600)
    app = create_app(config, engine=engine)
    with LiveServer(app, free_port()) as live:
        live.state = app.state.kvmux
        yield live


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_api_key_required_on_v1_but_not_health(server):
    assert httpx.get(server.url + "/v1/models").status_code == 401
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(server.url + "/v1/models", headers=_auth()).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_request_id_is_honoured_or_generated(server):
    given = httpx.get(server.url + "/health", headers={"X-Request-Id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(server.url + "/health").headers["x-request-id"]) >= 16


def test_body_size_limit(server):
    response = httpx.post(server.url + "/v1/completions", headers=_auth(), json={"prompt": "x" * 10_000})
    assert response.status_code == 413 and response.json()["error"]["code"] == 413


def test_logprobs_and_n(server):
    client = _client(server)
    out = client.completions.create(
        model="tiny-llama", prompt="abc", max_tokens=3, temperature=0, logprobs=2, n=2, extra_body={"ignore_eos": True}
    )
    assert len(out.choices) == 2 and out.usage.completion_tokens == 6
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 3 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        seed=1,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert chat.usage.completion_tokens == 3


def test_async_client_concurrent_streams(server):
    async def one(client, i):
        stream = await client.completions.create(
            model="tiny-llama",
            prompt=f"request {i}",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
        return chunks[-1].usage.completion_tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(4)))

    assert asyncio.run(main()) == [5, 5, 5, 5]


def test_tokenize_detokenize_roundtrip(server):
    tokens = httpx.post(server.url + "/tokenize", headers=_auth(), json={"prompt": "héllo"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(server.url + "/detokenize", headers=_auth(), json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "héllo"
    bad = httpx.post(server.url + "/detokenize", headers=_auth(), json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def _wait_idle(state, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if state.scheduler.num_running == 0 and state.scheduler.kv_reserved == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"still running: {state.scheduler.num_running}, kv {state.scheduler.kv_reserved}")


def _outcomes(server, reason: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=_auth(), timeout=10).text
    model = server.state.engine.info.served_name
    prefix = f'kvmux_request_outcomes_total{{model="{model}",policy="full",reason="{reason}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_streaming_client_disconnect_cancels_and_releases(server):
    body = {"prompt": "abc", "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    cancelled, finished = _outcomes(server, "cancelled"), _outcomes(server, "finished_length")
    with httpx.Client(timeout=30.0) as client:
        with client.stream("POST", server.url + "/v1/completions", headers=_auth(), json=body) as response:
            lines = 0
            for line in response.iter_lines():
                lines += line.startswith("data:")
                if lines == 3:
                    break  # leaving the block closes the connection mid-stream
    _wait_idle(server.state)
    # the request was stopped, not run on to its 3000 tokens
    assert _outcomes(server, "cancelled") == cancelled + 1
    assert _outcomes(server, "finished_length") == finished


def test_waiting_client_disconnect_cancels_and_releases(server):
    body = {"prompt": "abc", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", headers=_auth(), json=body, timeout=1.0)
    _wait_idle(server.state)


def test_deadline_stops_a_request(server):
    scheduler_timeout = server.state.config.request_timeout_s
    server.state.config.request_timeout_s = 0.5
    try:
        response = httpx.post(
            server.url + "/v1/completions",
            headers=_auth(),
            timeout=60,
            json={"prompt": "abc", "max_tokens": 3000, "ignore_eos": True},
        )
    finally:
        server.state.config.request_timeout_s = scheduler_timeout
    assert response.status_code == 408 and "deadline" in response.json()["error"]["message"]
    _wait_idle(server.state)
