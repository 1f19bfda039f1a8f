"""What a live server never shows a hostile client: internal exception text (a 500 names the request
id only), a malformed request id echoed back, or the model's path; and what it documents: every
request body in /openapi.json.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.server.hostile import MODEL, assert_error, post

pytestmark = pytest.mark.model


def test_internal_errors_do_not_leak_their_text(hostile_server, caplog):
    engine = hostile_server.state.engine

    def broken(*_args, **_kwargs):
        raise RuntimeError("secret detail /srv/private/path")

    original = engine.tokenize
    engine.tokenize = broken
    try:
        with caplog.at_level(logging.ERROR, logger="kvmux.server"):
            response = post(hostile_server.url, "/tokenize", {"prompt": "hi"}, headers={"X-Request-Id": "trace-42"})
    finally:
        engine.tokenize = original
    error = assert_error(response, 500)
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert "trace-42" in error["message"] and response.headers["x-request-id"] == "trace-42"
    logged = [r for r in caplog.records if "trace-42" in r.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])
    assert post(hostile_server.url, "/tokenize", {"prompt": "hi"}).status_code == 200


class BrokenPresets(dict):
    def values(self):
        raise RuntimeError("secret detail from outside a route's own error handling")


def test_errors_escaping_a_route_are_openai_shaped_500s(hostile_server):
    engine = hostile_server.state.engine
    original = engine.presets
    engine.presets = BrokenPresets(original)
    try:
        response = httpx.get(hostile_server.url + "/v1/policies", headers={"X-Request-Id": "trace-43"}, timeout=30)
    finally:
        engine.presets = original
    error = assert_error(response, 500)
    assert "secret" not in response.text and "trace-43" in error["message"]
    assert response.headers["x-request-id"] == "trace-43"
    assert httpx.get(hostile_server.url + "/v1/policies", timeout=30).status_code == 200


def test_malformed_request_id_is_replaced(hostile_server):
    response = httpx.get(hostile_server.url + "/health", headers={"X-Request-Id": "a b\tc" + "x" * 300})
    assert response.status_code == 200
    assert response.headers["x-request-id"] != "a b\tc" + "x" * 300 and len(response.headers["x-request-id"]) == 32


def test_models_never_show_a_path(hostile_server):
    card = httpx.get(hostile_server.url + "/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == card["root"] == MODEL
    root = hostile_server.state.engine.info.root
    assert root not in httpx.get(hostile_server.url + "/v1/models", timeout=30).text
    response = post(hostile_server.url, "/v1/completions", {"model": root, "prompt": "hi", "max_tokens": 1})
    assert_error(response, 404, "model")
    assert (
        post(hostile_server.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}).status_code
        == 200
    )


def test_openapi_documents_the_request_bodies(hostile_server):
    spec = httpx.get(hostile_server.url + "/openapi.json", timeout=30).json()
    for path, model in [
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/tokenize", "TokenizeRequest"),
        ("/detokenize", "DetokenizeRequest"),
    ]:
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/" + model)
    assert "kv_policy" in spec["components"]["schemas"]["CompletionRequest"]["properties"]
