"""The OpenAI-compatible API over real HTTP with the official `openai` client."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
SMALL_WINDOW = {"sink_tokens": 2, "window": 4}
# preset, overrides, tokens the policy must keep given the tokens it saw
PRESETS = [
    ("full", {}, lambda seen: seen),
    ("streaming_llm", SMALL_WINDOW, lambda seen: 6),
    ("streaming_llm_original", SMALL_WINDOW, lambda seen: 6),
]


@pytest.mark.parametrize(("preset", "overrides", "kept"), PRESETS, ids=[p[0] for p in PRESETS])
def test_completion_with_each_preset(client, preset, overrides, kept):
    out = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=6,
        temperature=0,
        extra_body={"kv_policy": {"preset": preset, **overrides}},
    )
    assert out.choices[0].text.strip()
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens > 0
    kv = out.model_extra["kv"]
    # the last token is never fed back: the session saw the prompt and 5 generated tokens
    assert kv["preset"] == preset and kv["tokens_seen"] == out.usage.prompt_tokens + 5
    assert kv["tokens_kept"] == kept(kv["tokens_seen"]) < (kv["tokens_seen"] if overrides else 10**9)


def test_completion_without_policy_uses_default(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert out.model_extra["kv"]["policy"] == "full"


def test_chat_non_streaming_and_streaming_agree(client):
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_completion_with_policy_object(client):
    stream = client.completions.create(
        model=MODEL,
        prompt="One, two, three,",
        max_tokens=5,
        temperature=0,
        stream=True,
        extra_body={"kv_policy": {"preset": "streaming_llm", "window": 16, "sink_tokens": 2}},
    )
    chunks = list(stream)
    assert sum(1 for c in chunks if c.choices) == 5
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_policies_health(live_server):
    models = httpx.get(live_server.url + "/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 8192
    assert models["data"][0]["root"]
    policies = httpx.get(live_server.url + "/v1/policies").json()
    names = {p["name"] for p in policies["data"]}
    assert {p[0] for p in PRESETS} <= names
    sllm = next(p for p in policies["data"] if p["name"] == "streaming_llm")
    assert sllm["params"]["sink_tokens"] == 4 and "window" in sllm["schema"]["properties"]
    assert httpx.get(live_server.url + "/health").status_code == 200


def _post(server, path, body, **kwargs):
    return httpx.post(
        server.url + path, timeout=60, **kwargs, **({"content": body} if isinstance(body, str) else {"json": body})
    )


BAD_INPUTS = [
    ("malformed JSON", "/v1/completions", "{not json", None),
    ("body not an object", "/v1/completions", "[1, 2]", None),
    ("wrong type", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": "", "max_tokens": 3}, "prompt"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("unknown preset", "/v1/completions", {"prompt": "hi", "kv_policy": "nope"}, "kv_policy.preset"),
    (
        "bad policy parameter value",
        "/v1/completions",
        {"prompt": "hi", "kv_policy": {"preset": "streaming_llm", "window": -5}},
        "kv_policy.window",
    ),
    (
        "unknown policy parameter",
        "/v1/completions",
        {"prompt": "hi", "kv_policy": {"preset": "streaming_llm", "windw": 5}},
        "kv_policy.windw",
    ),
    ("max_tokens < 1", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("max_tokens too large", "/v1/completions", {"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ("prompt too long", "/v1/completions", {"prompt": "hello " * 9000, "max_tokens": 4}, "prompt"),
    ("temperature out of range", "/v1/completions", {"prompt": "hi", "temperature": 9}, "temperature"),
]


@pytest.mark.parametrize("name,path,body,param", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_openai_error(live_server, name, path, body, param):
    response = _post(live_server, path, body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 400 and error["message"]
    assert error["param"] == param


def test_unknown_model_is_404(live_server):
    response = _post(live_server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"})
    assert response.status_code == 404
    assert "gpt-9" in response.json()["error"]["message"] and response.json()["error"]["param"] == "model"


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"kv_policy": "missing"})
    assert "missing" in str(info.value)


def test_bad_requests_do_not_disturb_requests_in_flight(client, live_server):
    import threading

    results = {}

    def long_request():
        results["long"] = client.completions.create(
            model=MODEL,
            prompt="Tell me a story about a dragon.",
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
        )

    thread = threading.Thread(target=long_request)
    thread.start()
    for _, path, body, _ in BAD_INPUTS[:6]:
        assert _post(live_server, path, body).status_code == 400
    thread.join(timeout=120)
    assert results["long"].usage.completion_tokens == 24


def test_unknown_fields_are_ignored(client):
    out = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=2, temperature=0, extra_body={"some_vendor_field": 1}
    )
    assert out.usage.completion_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_policy_that_cannot_serve_the_prompt_is_a_400_before_streaming(live_server, stream):
    # the last line (where infiniretri looks for the question) is 600 tokens long: no usable question
    body = {"prompt": "A note.\n" + "word " * 600, "max_tokens": 4, "stream": stream, "kv_policy": "infiniretri"}
    response = _post(live_server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "kv_policy"
    assert "question" in response.json()["error"]["message"]
