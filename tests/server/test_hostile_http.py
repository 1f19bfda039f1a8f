"""Hostile input against a live server: each request gets a 4xx in the OpenAI error shape (never a
500, a stall or unbounded work), and the server still serves a normal request afterwards.

Covers the body limit on chunked uploads, bounded stop lists, inputs that used to raise inside the
server (odd kv_policy shapes, huge integers, deep nesting, out-of-range seeds, tiny temperatures,
non-ASCII keys), internal errors that must not leak their text, tokenizing off the event loop, the
model path and the API docs behind the keys, CORS preflights with keys, the refusal to serve
unauthenticated on a public address, and the policies loading where triton is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kvmux.server.protocol import MAX_STOP_LENGTH, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from tests.server.conftest import start_server

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
KEY = "hostile-test-key"
LIMIT = 64 * 1024
BODY_TIMEOUT_S = 2.0
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def server(smollm):
    """A server with a small body limit, a short body deadline and at most 4 new tokens."""
    config = {"max_request_body_bytes": LIMIT, "request_body_timeout_s": BODY_TIMEOUT_S, "request_timeout_s": 60.0}
    with start_server(smollm, max_new=4, **config) as live:
        live.state = live.server.config.app.state.kvmux
        yield live


@pytest.fixture(scope="module")
def keyed(smollm):
    """A server with an API key and CORS on."""
    with start_server(smollm, max_new=4, api_keys=[KEY], cors_origins=[ORIGIN]) as live:
        live.state = live.server.config.app.state.kvmux
        yield live


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


# -- body size ---------------------------------------------------------------------------------


def chunks(data: bytes, size: int = 8192):
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("path", ["/tokenize", "/v1/completions"])
def test_chunked_body_over_the_limit_is_413(server, path):
    body = json.dumps({"prompt": "x" * (2 * LIMIT), "max_tokens": 1}).encode()
    response = httpx.post(
        server.url + path, content=chunks(body), headers={"content-type": "application/json"}, timeout=60
    )
    assert "content-length" not in response.request.headers  # sent with Transfer-Encoding: chunked
    error = assert_error(response, 413)
    assert str(LIMIT) in error["message"]
    assert_still_serving(server.url)


def test_chunked_body_within_the_limit_is_served(server):
    body = json.dumps({"prompt": "Hello " * 8000, "add_special_tokens": False}).encode()
    assert LIMIT / 2 < len(body) < LIMIT
    response = httpx.post(server.url + "/tokenize", content=chunks(body, 1000), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["count"] >= 8000


def test_client_leaving_a_chunked_stream_still_cancels_its_request(server):
    scheduler = server.state.scheduler
    original = scheduler.engine.max_new_tokens
    scheduler.engine.max_new_tokens = 3000  # long enough to still run when the client leaves
    try:
        body = json.dumps({"prompt": "Count: one, two,", "max_tokens": 3000, "stream": True, "ignore_eos": True})
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", server.url + "/v1/completions", content=chunks(body.encode(), 7)) as response:
                assert response.status_code == 200
                seen = 0
                for line in response.iter_lines():
                    seen += line.startswith("data: ")
                    if seen == 2:
                        break  # closing the connection mid-stream
        deadline = time.monotonic() + 60
        while scheduler.num_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.num_running == 0  # cancelled long before 3000 tokens
    finally:
        scheduler.engine.max_new_tokens = original


def send_stalled_body(port: int, headers: str, body: bytes) -> str:
    """Send the headers and part of a body, then nothing more; the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(headers.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer.decode("latin-1")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_stalled_body_is_408(server, framing):
    part = b'{"prompt": "Hel'
    if framing == "chunked":
        head, body = "Transfer-Encoding: chunked\r\n", f"{len(part):x}\r\n".encode() + part + b"\r\n"
    else:
        head, body = "Content-Length: 1000\r\n", part
    request = f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{head}"
    answer = send_stalled_body(server.port, request, body)
    status_line, _, rest = answer.partition("\r\n")
    assert status_line.split()[1] == "408", answer
    error = json.loads(rest[rest.index("\r\n\r\n") + 4 :])["error"]
    assert error["code"] == 408 and error["type"] == "TimeoutError" and "did not arrive" in error["message"]
    assert_still_serving(server.url)


# -- bounded stop lists ------------------------------------------------------------------------

STOP_CASES = [
    ("too many stop strings", {"stop": ["zz"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ("stop string too long", {"stop": "z" * (MAX_STOP_LENGTH + 1)}, "stop"),
    ("stop list entry too long", {"stop": ["a", "z" * (MAX_STOP_LENGTH + 1)]}, "stop"),
    ("too many stop token ids", {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
]


@pytest.mark.parametrize("name,fields,param", STOP_CASES, ids=[c[0] for c in STOP_CASES])
def test_unbounded_stop_lists_are_400(server, name, fields, param):
    response = post(server.url, "/v1/completions", {"prompt": "Hello", "max_tokens": 1, **fields})
    error = assert_error(response, 400, param)
    assert param in error["message"]
    assert_still_serving(server.url)


def test_stop_lists_at_the_bounds_are_served(server):
    stops = [chr(0x4E00 + i) * MAX_STOP_LENGTH for i in range(MAX_STOP_STRINGS)]
    body = {"prompt": "Hello", "max_tokens": 2, "stop": stops, "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))}
    response = post(server.url, "/v1/completions", body)
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
def test_inputs_that_used_to_raise_are_400(server, path, name, body, param):
    if path.endswith("chat/completions") and isinstance(body, dict):
        body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": [{"role": "user", "content": "hi"}]}
    error = assert_error(post(server.url, path, body), 400, param)
    assert (param or "JSON") in error["message"]
    assert_still_serving(server.url)


def test_many_unknown_fields_are_ignored_with_a_bounded_log_line(server, caplog):
    body = {"prompt": "Hello", "max_tokens": 1, **{f"field_{i}_" + "x" * 200: i for i in range(250)}}
    with caplog.at_level(logging.INFO, logger="kvmux.server"):
        response = post(server.url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    lines = [r.getMessage() for r in caplog.records if "unknown request fields" in r.getMessage()]
    assert lines and all(len(line) < 1500 for line in lines) and "and 240 more" in lines[0]


def test_form_encoded_body_is_a_400_asking_for_json(server):
    response = httpx.post(server.url + "/v1/completions", data={"prompt": "hi"}, timeout=60)
    error = assert_error(response, 400)
    assert "application/json" in error["message"]


def test_largest_seed_with_several_choices_is_served(server):
    body = {"prompt": "Hello", "max_tokens": 1, "seed": 2**63 - 1, "n": 3, "temperature": 1.0}
    response = post(server.url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 3


def test_tiny_temperature_samples_greedily(server):
    body = {"prompt": "The capital of France is", "max_tokens": 3, "ignore_eos": True}
    greedy = post(server.url, "/v1/completions", {**body, "temperature": 0})
    tiny = post(server.url, "/v1/completions", {**body, "temperature": 1e-300, "seed": 7})
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
def test_extreme_sampling_settings_are_served(server, fields):
    body = {"prompt": "Hello there", "max_tokens": 2, "seed": 3, "ignore_eos": True, **fields}
    response = post(server.url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_internal_errors_do_not_leak_their_text(server, caplog):
    engine = server.state.engine

    def broken(*_args, **_kwargs):
        raise RuntimeError("secret detail /srv/private/path")

    original = engine.tokenize
    engine.tokenize = broken
    try:
        with caplog.at_level(logging.ERROR, logger="kvmux.server"):
            response = post(server.url, "/tokenize", {"prompt": "hi"}, headers={"X-Request-Id": "trace-42"})
    finally:
        engine.tokenize = original
    error = assert_error(response, 500)
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert "trace-42" in error["message"] and response.headers["x-request-id"] == "trace-42"
    logged = [r for r in caplog.records if "trace-42" in r.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])
    assert post(server.url, "/tokenize", {"prompt": "hi"}).status_code == 200


class BrokenPresets(dict):
    def values(self):
        raise RuntimeError("secret detail from outside a route's own error handling")


def test_errors_escaping_a_route_are_openai_shaped_500s(server):
    engine = server.state.engine
    original = engine.presets
    engine.presets = BrokenPresets(original)
    try:
        response = httpx.get(server.url + "/v1/policies", headers={"X-Request-Id": "trace-43"}, timeout=30)
    finally:
        engine.presets = original
    error = assert_error(response, 500)
    assert "secret" not in response.text and "trace-43" in error["message"]
    assert response.headers["x-request-id"] == "trace-43"
    assert httpx.get(server.url + "/v1/policies", timeout=30).status_code == 200


def test_malformed_request_id_is_replaced(server):
    response = httpx.get(server.url + "/health", headers={"X-Request-Id": "a b\tc" + "x" * 300})
    assert response.status_code == 200
    assert response.headers["x-request-id"] != "a b\tc" + "x" * 300 and len(response.headers["x-request-id"]) == 32


# -- the event loop stays free -----------------------------------------------------------------


def test_health_answers_while_a_huge_tokenize_runs(live_server):
    text = "The quick brown fox jumps over the lazy dog. " * 70_000  # 3.15 MB, 700k tokens: seconds of work
    events: list[str] = []

    def big():
        with httpx.stream("POST", live_server.url + "/tokenize", json={"prompt": text}, timeout=300) as response:
            events.append(f"big headers {response.status_code}")
            response.read()

    thread = threading.Thread(target=big)
    thread.start()
    while thread.is_alive() and not any(e.startswith("big") for e in events):
        health = httpx.get(live_server.url + "/health", timeout=300)
        events.append(f"health {health.status_code}")
    thread.join(timeout=300)
    big_at = events.index("big headers 200")
    # /health kept answering while the big request was being served (before the loop fix: at most once)
    assert events[:big_at].count("health 200") >= 3, events[: big_at + 1]


def test_worker_pool_queue_is_bounded(smollm):
    with start_server(smollm, max_new=4, max_active_sessions=1, max_queued_requests=1) as live:
        state = live.server.config.app.state.kvmux
        assert state.max_cpu_pending == 2
        text = "The quick brown fox jumps over the lazy dog. " * 70_000
        big: list[httpx.Response] = []

        def tokenize_big():
            big.append(post(live.url, "/tokenize", {"prompt": text}, timeout=300))

        threads = [threading.Thread(target=tokenize_big, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while state.cpu_pending < 2 and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.cpu_pending == 2, "the large tokenizations never filled the worker pool"
        refused = post(live.url, "/tokenize", {"prompt": "hi"})
        assert_error(refused, 429)
        assert refused.headers["retry-after"] == "1"
        for thread in threads:
            thread.join(timeout=300)
        assert [r.status_code for r in big] == [200, 200] and big[0].json()["count"] > 500_000
        assert post(live.url, "/tokenize", {"prompt": "hi"}).status_code == 200
        assert_still_serving(live.url)


# -- leaks -------------------------------------------------------------------------------------


def test_models_never_show_a_path(server):
    card = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == card["root"] == MODEL
    root = server.state.engine.info.root
    assert root not in httpx.get(server.url + "/v1/models", timeout=30).text
    response = post(server.url, "/v1/completions", {"model": root, "prompt": "hi", "max_tokens": 1})
    assert_error(response, 404, "model")
    assert post(server.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_follow_the_api_keys(keyed, path):
    assert_error(httpx.get(keyed.url + path, timeout=30), 401)
    assert httpx.get(keyed.url + path, headers=auth(), timeout=30).status_code == 200
    keyed.state.config.auth_docs = False
    try:
        assert httpx.get(keyed.url + path, timeout=30).status_code == 200
    finally:
        keyed.state.config.auth_docs = True


def test_unknown_paths_need_the_key_too(keyed):
    assert_error(httpx.get(keyed.url + "/nothing-here", timeout=30), 401)
    assert_error(httpx.get(keyed.url + "/nothing-here", headers=auth(), timeout=30), 404)


@pytest.mark.parametrize("value", ["Bearer clé-été", "Bearer \u00ff\u00fe", "Basic \u00e9"])
def test_non_ascii_authorization_is_401(keyed, value):
    response = httpx.get(keyed.url + "/v1/models", headers={"Authorization": value.encode("latin-1")}, timeout=30)
    assert_error(response, 401)
    assert_still_serving(keyed.url, auth())


def test_cors_preflight_needs_no_key(keyed):
    preflight = httpx.options(
        keyed.url + "/v1/chat/completions",
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
    refused = post(keyed.url, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={"Origin": ORIGIN})
    assert_error(refused, 401)
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    served = post(keyed.url, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers={"Origin": ORIGIN, **auth()})
    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == ORIGIN


def test_openapi_documents_the_request_bodies(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    for path, model in [
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/tokenize", "TokenizeRequest"),
        ("/detokenize", "DetokenizeRequest"),
    ]:
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/" + model)
    assert "kv_policy" in spec["components"]["schemas"]["CompletionRequest"]["properties"]


# -- refusing to serve unauthenticated on a public address -------------------------------------


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


# -- no triton installed -----------------------------------------------------------------------

NO_TRITON = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
from pathlib import Path
from kvmux.policies.presets import load_presets
from kvmux.policies.hip import policy as hip
from kvmux.server.sampling import SamplingParams
from tests.tiny_models import tiny_engine

presets = load_presets(Path(sys.argv[1]))
assert hip.triton_kernels() is None
engine = tiny_engine()
policy = {"preset": "hip", "dense_layers": 0, "mask_k": 8, "block_size_q": 8, "window": 8, "sink_tokens": 2}
out = engine.generate(prompt="abcdefgh" * 12, sampling=SamplingParams(max_tokens=3, temperature=0), kv_policy=policy)
assert out.completion_tokens == 3, out
print("presets", len(presets), sorted(presets))
print("hip", out.kv["policy"], out.completion_tokens)
"""


def test_policies_load_and_hip_runs_without_triton():
    presets_dir = ROOT / "configs" / "policies"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", NO_TRITON, str(presets_dir)], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = len(list(presets_dir.glob("*.yaml")))
    assert f"presets {expected} " in run.stdout and "hip hip 3" in run.stdout, run.stdout


def test_container_setup_needs_a_key():
    import yaml

    from kvmux.server.config import load_server_config
    from kvmux.server.serve import unauthenticated_exposure

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert compose["services"]["kvmux"]["environment"]["KVMUX_API_KEY"].startswith("${KVMUX_API_KEY:?")
    config = load_server_config(ROOT / "docker" / "server.yaml")
    assert config.host == "0.0.0.0" and unauthenticated_exposure(config)  # the image alone refuses
    assert unauthenticated_exposure(config.model_copy(update={"api_keys": ["k"]})) is None
