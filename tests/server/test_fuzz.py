"""Fuzz the live server: schemathesis over its OpenAPI schema, plus hypothesis-made JSON bodies.

The POST routes take typed pydantic bodies, so the server's own OpenAPI schema declares each
request model and schemathesis generates schema-shaped and schema-breaking bodies from it (every
endpoint; every POST in both modes). Separately, arbitrary JSON values and near-valid objects
(real preset names, odd values in every known field) go to the generation routes. Nothing may
answer 5xx, no stream may carry an internal error, and the server must still serve a normal
request afterwards. The server allows at most 2 new tokens so that valid requests stay cheap;
examples are bounded and derandomized.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.server.conftest import start_server

pytestmark = pytest.mark.model

REQUEST_MODELS = {
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
}
EXAMPLES_PER_OPERATION = 12
JSON_EXAMPLES = 40
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # report the first failure as found, without shrinking
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_server(smollm):
    with start_server(smollm, max_new=2, request_timeout_s=30.0) as server:
        yield server


def assert_request_bodies_declared(spec: dict[str, Any]) -> None:
    """Every POST route declares its pydantic request model as a required JSON body."""
    for path, model in REQUEST_MODELS.items():
        body = spec["paths"][path]["post"].get("requestBody")
        assert body and body.get("required"), f"POST {path} declares no required request body"
        assert body["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert spec["components"]["schemas"][model]["properties"], model


def server_failure(status: int, content_type: str, text: str) -> str | None:
    """Why a response counts as a server failure (5xx, or an internal error inside a 200 stream)."""
    if status >= 500:
        return f"HTTP {status}: {text[:500]}"
    if status == 200 and content_type.startswith("text/event-stream"):
        for line in text.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            body = json.loads(line[6:])
            error = body.get("error") if isinstance(body, dict) else None
            if error and int(error.get("code") or 0) >= 500:
                return f"stream error: {error}"
    return None


def assert_still_serving(url: str) -> None:
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    out = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=120)
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["completion_tokens"] >= 1


def fuzz_operation(url: str, operation, mode: GenerationMode, failures: list[str]) -> int:
    """Send a bounded number of generated cases for one operation; returns how many were sent."""
    sent = []

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=url, timeout=120)
        sent.append(1)
        content_type = response.headers.get("content-type") or [""]  # schemathesis: header -> list of values
        problem = server_failure(response.status_code, content_type[0], response.text)
        if problem:
            failures.append(f"{operation.label} ({mode.value}): {problem}\n  {case.as_curl_command()}")

    run()
    return len(sent)


def test_schema_fuzz_finds_no_server_errors(fuzz_server):
    url = fuzz_server.url
    raw = httpx.get(url + "/openapi.json", timeout=30).json()
    assert_request_bodies_declared(raw)
    schema = schemathesis.openapi.from_dict(raw)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/health", "/v1/models", *REQUEST_MODELS}
    assert all(op.body for op in operations if op.method.upper() == "POST")
    failures: list[str] = []
    calls = 0
    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if operation.body:  # schema-breaking bodies only where a body is declared
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            calls += fuzz_operation(url, operation, mode, failures)
    assert calls >= len(operations)
    assert not failures, "\n".join(failures[:10])
    assert_still_serving(url)


JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUE = st.recursive(
    JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)


def near_valid_bodies(presets: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the routes' real field names, holding valid-looking or odd values."""
    small = st.integers(min_value=-3, max_value=3)
    token_ids = st.lists(st.integers(min_value=-5, max_value=2**40) | st.integers(0, 49151), max_size=6)
    kv_policy = st.sampled_from(presets) | st.fixed_dictionaries(
        {"preset": st.sampled_from(presets)},
        optional={"window": small | JSON_LEAF, "sink_tokens": small | JSON_LEAF, "query": JSON_LEAF},
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": JSON_VALUE}
    )
    fields = {
        "prompt": st.text(max_size=40) | token_ids | JSON_VALUE,
        "messages": st.lists(message, max_size=3) | JSON_VALUE,
        "max_tokens": small | JSON_LEAF,
        "max_completion_tokens": small | JSON_LEAF,
        "n": small | JSON_LEAF,
        "stream": st.booleans() | JSON_LEAF,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON_VALUE,
        "kv_policy": kv_policy | JSON_VALUE,
        "logprobs": st.booleans() | small | JSON_LEAF,
        "top_logprobs": small | JSON_LEAF,
        "temperature": st.floats(-1, 3) | JSON_LEAF,
        "top_p": st.floats(-1, 2) | JSON_LEAF,
        "top_k": small | JSON_LEAF,
        "seed": st.integers() | JSON_LEAF,
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | JSON_LEAF,
        "stop_token_ids": token_ids | JSON_LEAF,
        "repetition_penalty": st.floats(-1, 20) | JSON_LEAF,
        "ignore_eos": st.booleans() | JSON_LEAF,
        "model": st.sampled_from(["SmolLM2-135M-Instruct", "../../etc/passwd", ""]) | JSON_LEAF,
    }
    return st.fixed_dictionaries({}, optional=fields)


def test_generated_json_bodies_find_no_server_errors(fuzz_server):
    url = fuzz_server.url
    presets = [p["name"] for p in httpx.get(url + "/v1/policies", timeout=30).json()["data"]]
    failures: list[str] = []
    routes = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
    bodies = near_valid_bodies(presets).map(json.dumps) | JSON_VALUE.map(json.dumps) | st.binary(max_size=64)

    @settings(FUZZ_SETTINGS, max_examples=JSON_EXAMPLES)
    @given(route=routes, body=bodies)
    def run(route, body):
        response = httpx.post(url + route, content=body, headers={"content-type": "application/json"}, timeout=120)
        problem = server_failure(response.status_code, response.headers.get("content-type", ""), response.text)
        if problem:
            failures.append(f"POST {route} {body!r:.300}: {problem}")

    run()
    assert not failures, "\n".join(failures[:10])
    assert_still_serving(url)
