"""API keys against hostile clients: the API docs and unknown paths behind the keys, non-ASCII
Authorization headers, CORS preflights answered without a key, and the refusal to serve
unauthenticated on a public address (the command line and the container setup).
"""

from __future__ import annotations

import os

import httpx
import pytest

from tests.server.hostile import ORIGIN, ROOT, assert_error, assert_still_serving, auth, post

pytestmark = pytest.mark.model


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_follow_the_api_keys(keyed_server, path):
    assert_error(httpx.get(keyed_server.url + path, timeout=30), 401)
    assert httpx.get(keyed_server.url + path, headers=auth(), timeout=30).status_code == 200
    keyed_server.state.config.auth_docs = False
    try:
        assert httpx.get(keyed_server.url + path, timeout=30).status_code == 200
    finally:
        keyed_server.state.config.auth_docs = True


def test_unknown_paths_need_the_key_too(keyed_server):
    assert_error(httpx.get(keyed_server.url + "/nothing-here", timeout=30), 401)
    assert_error(httpx.get(keyed_server.url + "/nothing-here", headers=auth(), timeout=30), 404)


@pytest.mark.parametrize("value", ["Bearer clé-été", "Bearer \u00ff\u00fe", "Basic \u00e9"])
def test_non_ascii_authorization_is_401(keyed_server, value):
    response = httpx.get(
        keyed_server.url + "/v1/models", headers={"Authorization": value.encode("latin-1")}, timeout=30
    )
    assert_error(response, 401)
    assert_still_serving(keyed_server.url, auth())


def test_cors_preflight_needs_no_key(keyed_server):
    preflight = httpx.options(
        keyed_server.url + "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=30,
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    # the real request still needs the key, and its 401 is readable by the page
    refused = post(keyed_server.url, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={"Origin": ORIGIN})
    assert_error(refused, 401)
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    served = post(
        keyed_server.url, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={"Origin": ORIGIN, **auth()}
    )
    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == ORIGIN


@pytest.fixture()
def no_serving(monkeypatch):
    """cmd_serve with model loading and uvicorn replaced by recorders."""
    import kvmux.server.serve as serve

    calls: list[str] = []
    monkeypatch.setattr(serve, "create_app", lambda config: calls.append(f"create_app {config.host}") or object())
    monkeypatch.setattr(serve, "run_server", lambda *a, **k: calls.append("run"), raising=False)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: calls.append("run"))
    monkeypatch.delenv("KVMUX_API_KEY", raising=False)
    return calls


def test_public_host_without_a_key_is_refused_before_loading(no_serving, capsys):
    from kvmux.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "8000"]) == 2
    assert no_serving == []
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "--allow-unauthenticated" in err and "KVMUX_API_KEY" in err


@pytest.mark.parametrize(
    "argv,env",
    [
        (["--host", "0.0.0.0", "--allow-unauthenticated"], {}),
        (["--host", "0.0.0.0", "--api-key", "k"], {}),
        (["--host", "0.0.0.0"], {"KVMUX_API_KEY": "k"}),
        (["--host", "127.0.0.1"], {}),
        (["--host", "localhost"], {}),
        (["--host", "::1"], {}),
    ],
)
def test_serving_is_allowed_with_a_key_an_opt_in_or_loopback(no_serving, monkeypatch, argv, env):
    from kvmux.cli import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert main(["serve", *argv, "--port", "8000"]) == 0
    assert no_serving[0].startswith("create_app") and no_serving[-1] == "run"
    assert "HF_TOKEN" not in os.environ  # only the model download needed it


def test_container_setup_needs_a_key():
    import yaml

    from kvmux.server.config import load_server_config
    from kvmux.server.serve import unauthenticated_exposure

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert compose["services"]["kvmux"]["environment"]["KVMUX_API_KEY"].startswith("${KVMUX_API_KEY:?")
    config = load_server_config(ROOT / "docker" / "server.yaml")
    assert config.host == "0.0.0.0" and unauthenticated_exposure(config)  # the image alone refuses
    assert unauthenticated_exposure(config.model_copy(update={"api_keys": ["k"]})) is None
