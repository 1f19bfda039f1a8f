"""Hostile request fields against a live server: each gets a 4xx in the OpenAI error shape (never a
500, a stall or unbounded work), and the server still serves a normal request afterwards.

Covers bounded stop lists, inputs that used to raise inside the server (odd kv_policy shapes, huge
integers, deep nesting, out-of-range seeds, invalid UTF-8), many unknown fields, and the extremes
of the sampling settings (the largest seed, tiny temperatures, degenerate penalties and cut-offs).
"""

from __future__ import annotations

import logging

import pytest

from kvmux.server.protocol import MAX_STOP_LENGTH, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from tests.server.hostile import assert_error, assert_still_serving, post

pytestmark = pytest.mark.model


STOP_CASES = [
    ("too many stop strings", {"stop": ["zz"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ("stop string too long", {"stop": "z" * (MAX_STOP_LENGTH + 1)}, "stop"),
    ("stop list entry too long", {"stop": ["a", "z" * (MAX_STOP_LENGTH + 1)]}, "stop"),
    ("too many stop token ids", {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
]


@pytest.mark.parametrize("name,fields,param", STOP_CASES, ids=[c[0] for c in STOP_CASES])
def test_unbounded_stop_lists_are_400(hostile_server, name, fields, param):
    response = post(hostile_server.url, "/v1/completions", {"prompt": "Hello", "max_tokens": 1, **fields})
    error = assert_error(response, 400, param)
    assert param in error["message"]
    assert_still_serving(hostile_server.url)


def test_stop_lists_at_the_bounds_are_served(hostile_server):
    stops = [chr(0x4E00 + i) * MAX_STOP_LENGTH for i in range(MAX_STOP_STRINGS)]
    body = {"prompt": "Hello", "max_tokens": 2, "stop": stops, "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))}
    response = post(hostile_server.url, "/v1/completions", body)
    assert response.status_code == 200, response.text


# -- inputs that used to raise inside the server -----------------------------------------------

HUGE_INT = "9" * 5000
DEEP = "[" * 3000 + "]" * 3000
RAISING_CASES = [
    ("preset not a string", {"prompt": "hi", "max_tokens": 1, "kv_policy": {"preset": []}}, "kv_policy.preset"),
    ("query not a string", {"prompt": "hi", "max_tokens": 1, "kv_policy": {"query": {"a": 1}}}, "kv_policy.query"),
    ("5000-digit integer", '{"prompt": "hi", "max_tokens": ' + HUGE_INT + "}", None),
    ("5000-digit integer, unknown field", '{"prompt": "hi", "x": [' + HUGE_INT + "]}", None),
    ("3000-deep nesting", '{"prompt": "hi", "x": ' + DEEP + "}", None),
    ("3000-deep nesting in kv_policy", '{"prompt": "hi", "kv_policy": {"preset": ' + DEEP + "}}", None),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', None),
    ("seed 2^64", {"prompt": "hi", "max_tokens": 1, "seed": 2**64}, "seed"),
    ("seed 2^64-1 with n 2", {"prompt": "hi", "max_tokens": 1, "seed": 2**64 - 1, "n": 2}, "seed"),
    ("seed below -2^63", {"prompt": "hi", "max_tokens": 1, "seed": -(2**63) - 1}, "seed"),
    ("body not an object", "[1, 2]", None),
    ("empty body", "", None),
]


@pytest.mark.parametrize("name,body,param", RAISING_CASES, ids=[c[0] for c in RAISING_CASES])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_inputs_that_used_to_raise_are_400(hostile_server, path, name, body, param):
    if path.endswith("chat/completions") and isinstance(body, dict):
        body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "hi"}]}
    error = assert_error(post(hostile_server.url, path, body), 400, param)
    assert (param or "JSON") in error["message"]
    assert_still_serving(hostile_server.url)


def test_many_unknown_fields_are_ignored_with_a_bounded_log_line(hostile_server, caplog):
    body = {"prompt": "Hello", "max_tokens": 1, **{f"field_{i}_" + "x" * 200: i for i in range(250)}}
    with caplog.at_level(logging.INFO, logger="kvmux.server"):
        response = post(hostile_server.url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    lines = [r.getMessage() for r in caplog.records if "unknown request fields" in r.getMessage()]
    assert lines and all(len(line) < 1500 for line in lines) and "and 240 more" in lines[0]


def test_largest_seed_with_several_choices_is_served(hostile_server):
    body = {"prompt": "Hello", "max_tokens": 1, "seed": 2**63 - 1, "n": 3, "temperature": 1.0}
    response = post(hostile_server.url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 3


def test_tiny_temperature_samples_greedily(hostile_server):
    body = {"prompt": "The capital of France is", "max_tokens": 3, "ignore_eos": True}
    greedy = post(hostile_server.url, "/v1/completions", {**body, "temperature": 0})
    tiny = post(hostile_server.url, "/v1/completions", {**body, "temperature": 1e-300, "seed": 7})
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


EXTREME_SAMPLING = [
    {"repetition_penalty": 1e-300, "temperature": 1.0},
    {"repetition_penalty": 1e-300, "temperature": 2.0, "top_k": 5},
    {"temperature": 2.0, "top_p": 1e-300},
    {"temperature": 1.0, "top_k": 10**30, "min_p": 1.0},
    {"stop_token_ids": [10**30, -5]},
]


@pytest.mark.parametrize("fields", EXTREME_SAMPLING, ids=lambda f: ",".join(f))
def test_extreme_sampling_settings_are_served(hostile_server, fields):
    body = {"prompt": "Hello there", "max_tokens": 2, "seed": 3, "ignore_eos": True, **fields}
    response = post(hostile_server.url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
