"""The policy arena over HTTP on a tiny model: the page and its files load without an API key and
are all shipped in the package; other paths under /arena and the API itself still need the key;
the streamed chat request the page sends answers with the KV figures it shows."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

import httpx
import pytest

from kvmux.server.arena import ASSETS, PAGE, _asset_dir
from kvmux.server.config import ServerConfig
from kvmux.server.serve import create_app
from tests.server.conftest import LiveServer, free_port
from tests.server.hostile import ROOT, assert_error
from tests.tiny_models import tiny_engine

KEY = "arena-test-key"
MEDIA = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
REFERENCE = re.compile(r"""(?:href|src)="(/arena/[^"]+)"|from "\./([^"]+)\"""")


@pytest.fixture(scope="module")
def server():
    app = create_app(ServerConfig(api_keys=[KEY]), engine=tiny_engine(max_new_tokens=64))
    with LiveServer(app, free_port()) as live:
        yield live


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _referenced(text: str) -> set[str]:
    return {path or f"/arena/{module}" for path, module in REFERENCE.findall(text)}


def test_page_and_every_file_it_loads_need_no_key(server):
    page = httpx.get(server.url + "/arena", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    seen, todo = set(), _referenced(page.text)
    while todo:  # the page's links, then every module's imports, transitively
        path = todo.pop()
        seen.add(path)
        response = httpx.get(server.url + path, timeout=30)
        assert response.status_code == 200, path
        suffix = path[path.rindex(".") :]
        assert response.headers["content-type"].startswith(MEDIA[suffix]), path
        todo |= _referenced(response.text) - seen
    assert {"/arena/main.js", "/arena/api.js", "/arena/arena.css"} <= seen
    # nothing is shipped that the page never loads
    assert seen == {f"/arena/{name}" for name in ASSETS if name != PAGE}


def test_other_paths_follow_the_api_key_rules(server):
    assert_error(httpx.get(server.url + "/arena/nothing.js", timeout=30), 401)
    assert_error(httpx.get(server.url + "/arena/nothing.js", headers=_auth(), timeout=30), 404)
    assert_error(httpx.get(server.url + "/arena/index.html", headers=_auth(), timeout=30), 404)
    assert_error(httpx.get(server.url + "/arena/..%2Fapp.py", headers=_auth(), timeout=30), 404)
    assert_error(httpx.get(server.url + "/v1/policies", timeout=30), 401)
    assert httpx.get(server.url + "/v1/policies", headers=_auth(), timeout=30).status_code == 200
    assert "/arena" not in httpx.get(server.url + "/openapi.json", headers=_auth(), timeout=30).text


def test_every_arena_file_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = patterns["kvmux.server"]
    names = [entry.name for entry in _asset_dir().iterdir()]
    assert set(names) == set(ASSETS)
    assert all(any(fnmatch.fnmatch(f"static/arena/{name}", p) for p in shipped) for name in names)


def _stream(server, kv_policy) -> list[dict]:
    body = {
        "messages": [{"role": "user", "content": "Count: one two three four five six"}],
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "kv_policy": kv_policy,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        assert r.status_code == 200
        lines = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("kv_policy", ["full", {"preset": "streaming_llm", "sink_tokens": 2, "window": 4}])
def test_streamed_answer_ends_with_usage_and_kv(server, kv_policy):
    chunks = _stream(server, kv_policy)
    *tokens, last = chunks
    assert len(tokens) == 5 and all(c["choices"] for c in tokens)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    kv = last["kv"]
    preset = kv_policy if isinstance(kv_policy, str) else kv_policy["preset"]
    assert kv["preset"] == preset and kv["tokens_seen"] == last["usage"]["prompt_tokens"] + 4
    if preset == "full":
        assert kv["tokens_kept"] == kv["tokens_seen"] and kv["kv_bytes_kept"] == kv["kv_bytes_full"]
    else:
        assert kv["tokens_kept"] == 6 and kv["kv_bytes_kept"] < kv["kv_bytes_full"]


def test_bad_overrides_are_a_400_naming_the_field(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "kv_policy": {"preset": "full", "x": 1}}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, headers=_auth(), timeout=30)
    assert_error(response, 400, "kv_policy.x")
