"""Shared by the hostile-client tests (test_hostile_*.py): the limits of their servers (started by
the `hostile_server` and `keyed_server` fixtures in conftest.py) and the checks every such test
makes: a 4xx in the OpenAI error shape, and a server that still serves afterwards.
"""

from __future__ import annotations

from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
KEY = "hostile-test-key"
LIMIT = 64 * 1024
BODY_TIMEOUT_S = 2.0
ORIGIN = "https://app.example"


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    assert error["param"] == param, error
    return error


def assert_still_serving(url: str, headers: dict[str, str] | None = None) -> None:
    out = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 1}, headers=headers, timeout=120)
    assert out.status_code == 200, out.text
    assert out.json()["usage"]["completion_tokens"] == 1


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    kwargs.setdefault("timeout", 120)
    if isinstance(body, (str, bytes)):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, **kwargs)
    return httpx.post(url + path, json=body, **kwargs)
