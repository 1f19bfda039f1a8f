"""Requests that ask for unbounded memory or work, against a live server: each is refused before any
work starts (400 when it can never fit this server's limits, 503 when it needs more memory than the
budget), in the OpenAI error shape, and the server still serves a normal request afterwards.

Covers a long `kv_policy.query`, a non-string `kv_policy.preset`, prompts over the derived prompt
limit, requests whose KV or largest step exceeds the memory budget, policy overrides beyond their
caps, and FlexPrefill's whole-prompt pass split beyond `max_single_pass_tokens`.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from kvmux.policies.presets import load_presets
from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.limits import AUTO_MAX_PROMPT_TOKENS, cgroup_room_bytes, prepared_request_bytes, resolve_limits
from kvmux.server.sampling import SamplingParams
from kvmux.server.serve import create_app
from tests.server.conftest import LiveServer, free_port

pytestmark = pytest.mark.model

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "policies"
BUDGET = 1 << 30  # an explicit budget, so the derived prompt limit does not depend on this machine
QUESTION = "What colour is the grass?"


def _engine(smollm, **limits) -> Engine:
    return Engine(smollm, load_presets(PRESETS), prefill_chunk_tokens=512, max_new_tokens=8, **limits)


def _serve(engine: Engine, **config) -> LiveServer:
    # kv_memory_budget_bytes: auto (the default) hands the scheduler the engine's resolved budget
    app = create_app(ServerConfig(request_timeout_s=120.0, **config), engine=engine)
    return LiveServer(app, free_port())


@pytest.fixture(scope="module")
def engine(smollm):
    return _engine(smollm, kv_memory_budget_bytes=BUDGET, max_prompt_tokens="auto", max_query_tokens=1024)


@pytest.fixture(scope="module")
def server(engine):
    with _serve(engine) as live:
        yield live


def _post(server, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def _assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]
    return error


def _assert_serves(server) -> None:
    response = _post(server, {"prompt": "The sky is", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def _passage(sentences: int) -> str:
    return " ".join(f"Line {i}: the grass in field {i} is green." for i in range(sentences))


# -- item: kv_policy.query and kv_policy.preset --------------------------------------------------------


@pytest.mark.parametrize("preset", ["actqkv", "infiniretri"])
def test_query_longer_than_max_query_tokens_is_400(server, engine, preset):
    query = "where is the key hidden " * 400  # ~2K tokens (the server accepts 1024)
    assert len(engine.tokenize(query, add_special_tokens=False)) > 1024
    body = {"prompt": _passage(5) + "\n\n" + QUESTION, "max_tokens": 2, "kv_policy": {"preset": preset, "query": query}}
    _assert_error(_post(server, body), 400, "kv_policy.query", "1024")
    _assert_serves(server)


def test_query_within_the_limit_is_scored_in_pieces(server):
    """A ~900-token question (9 heads x 900 keys: two pieces of question rows) runs and answers."""
    query = "which field has green grass " * 150
    body = {"prompt": _passage(8), "max_tokens": 2, "temperature": 0, "kv_policy": {"preset": "actqkv", "query": query}}
    response = _post(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["kv"]["policy"] == "actqkv"
    _assert_serves(server)


@pytest.mark.parametrize("preset", [[], {"name": "full"}, 5, None, True])
def test_non_string_preset_is_400(server, preset):
    body = {"prompt": "hi", "max_tokens": 2, "kv_policy": {"preset": preset}}
    _assert_error(_post(server, body), 400, "kv_policy.preset", "preset")
    _assert_serves(server)


# -- item: prompt length and memory ---------------------------------------------------------------------


def test_derived_prompt_limit_follows_the_budget(engine, smollm):
    info = smollm.info
    expected = min(max(BUDGET // info.kv_bytes_per_token, info.max_context), AUTO_MAX_PROMPT_TOKENS)
    assert engine.max_prompt_tokens == expected > info.max_context
    machine = resolve_limits(info)  # both settings auto: measured on this machine
    assert machine.kv_memory_budget_bytes is not None and machine.kv_memory_budget_bytes > 0
    assert info.max_context <= machine.max_prompt_tokens <= AUTO_MAX_PROMPT_TOKENS
    assert ServerConfig().kv_memory_budget_bytes == "auto" and ServerConfig().max_prompt_tokens == "auto"


def test_container_memory_limit_bounds_the_available_memory(tmp_path):
    """/proc/meminfo shows the host's RAM inside a container; the cgroup's limit - usage is the real room."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")
    (v2 / "memory.current").write_text("1073741824\n")
    assert cgroup_room_bytes(v2) == 3 << 30
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_room_bytes(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2147483648")
    (v1 / "memory.usage_in_bytes").write_text("3221225472")  # over the limit: no room
    assert cgroup_room_bytes(tmp_path / "v1") == 0
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "unlimited"
    assert cgroup_room_bytes(tmp_path / "v1") is None
    assert cgroup_room_bytes(tmp_path / "absent") is None


def test_serve_flags_take_auto_or_numbers():
    from kvmux.cli import _config_from_args, build_parser

    argv = ["serve", "--max-prompt-tokens", "auto", "--kv-memory-budget-bytes", "123456789", "--max-query-tokens", "64"]
    config = _config_from_args(build_parser().parse_args(argv))
    assert (config.max_prompt_tokens, config.kv_memory_budget_bytes, config.max_query_tokens) == ("auto", 123456789, 64)
    config = _config_from_args(build_parser().parse_args(["serve", "--max-prompt-tokens", "5000"]))
    assert config.max_prompt_tokens == 5000 and config.kv_memory_budget_bytes == "auto"  # configs/server.yaml


@pytest.mark.parametrize("preset", ["streaming_llm", "actqkv", "infiniretri"])
def test_token_array_over_the_derived_prompt_limit_is_400(server, engine, preset):
    """Presets without a context limit used to accept any token array the body could carry."""
    ids = [42] * (engine.max_prompt_tokens + 1)
    body = {"prompt": ids, "max_tokens": 2, "kv_policy": preset}
    _assert_error(_post(server, body), 400, "prompt", str(engine.max_prompt_tokens))
    _assert_serves(server)


def test_kv_over_the_budget_is_503(server, engine):
    """ActQKV keeps every token (its block store grows by doubling): 12K tokens need more than 1 GiB."""
    ids = [42] * 12000
    request = engine.prepare(prompt=ids, sampling=SamplingParams(max_tokens=2), kv_policy="actqkv")
    kv, step = prepared_request_bytes(engine, request)
    assert kv > BUDGET
    body = {"prompt": ids, "max_tokens": 2, "kv_policy": "actqkv"}
    error = _assert_error(_post(server, body), 503, None, "budget", str(BUDGET))
    assert error["type"] == "ServiceUnavailableError"
    _assert_serves(server)


def test_largest_step_counts_toward_the_budget(smollm):
    """InfiniRetri's scoring pass over a question's rows: the KV fits the budget, KV + step does not."""
    engine = _engine(smollm, kv_memory_budget_bytes=None)
    body = {"prompt": _passage(40) + "\n\n" + QUESTION, "max_tokens": 2, "kv_policy": "infiniretri"}
    request = engine.prepare(prompt=body["prompt"], sampling=SamplingParams(max_tokens=2), kv_policy="infiniretri")
    kv, step = prepared_request_bytes(engine, request)
    assert step > 0
    budget = kv + step // 2
    engine = _engine(smollm, kv_memory_budget_bytes=budget)
    with _serve(engine) as live:
        error = _assert_error(_post(live, body), 503, None, "largest step", str(budget))
        assert error["type"] == "ServiceUnavailableError"
        _assert_serves(live)


# -- item: override ranges -------------------------------------------------------------------------------

OVERRIDES = [
    ("actqkv", "n_local", 65536, "4096"),
    ("actqkv", "window", 4096, "512"),
    ("streaming_llm", "window", 1_000_000, "131072"),
    ("streaming_llm", "sink_tokens", 100_000, "256"),
    ("lazy_eviction", "budget", 10_000_000, "131072"),
    ("lazy_eviction", "calibration_rows", 65536, "8192"),
    ("hip", "mask_k", 1_000_000, "16384"),
    ("hip", "block_size_q", 1024, "128"),
    ("flexprefill", "block_size", 1024, "512"),
    ("flexprefill", "prefill_chunk", 1_000_000, "131072"),
    ("flexprefill", "max_single_pass_tokens", 1_000_000, "131072"),
    ("infiniretri", "max_question_tokens", 65536, "4096"),
    ("infiniretri", "chunk_tokens", 65536, "16384"),
]


@pytest.mark.parametrize(("preset", "name", "value", "cap"), OVERRIDES)
def test_override_beyond_its_cap_is_400(server, preset, name, value, cap):
    body = {"prompt": "hi", "max_tokens": 2, "kv_policy": {"preset": preset, name: value}}
    _assert_error(_post(server, body), 400, f"kv_policy.{name}", cap)
    _assert_serves(server)


def test_actqkv_keys_per_window_are_capped(server):
    """Each field within its range, together over the keys one window may attend: one step's scores."""
    body = {"prompt": "hi", "max_tokens": 2, "kv_policy": {"preset": "actqkv", "n_local": 4096, "topk": 1024}}
    _assert_error(_post(server, body), 400, "kv_policy", "16384")
    _assert_serves(server)


# -- item: long uninterruptible steps --------------------------------------------------------------------


def test_flexprefill_pass_longer_than_the_cap_is_split(server):
    """Beyond max_single_pass_tokens the prompt is prefilled in forwards of that size, the last one ending
    at the prompt's end (300 tokens, cap 128: 44 + 128 + 128)."""
    ids = [42] * 300
    kv_policy = {"preset": "flexprefill", "max_single_pass_tokens": 128}
    response = _post(server, {"prompt": ids, "max_tokens": 2, "temperature": 0, "kv_policy": kv_policy})
    assert response.status_code == 200, response.text
    assert response.json()["kv"]["prefill_forwards"] == 3
    response = _post(server, {"prompt": ids, "max_tokens": 2, "temperature": 0, "kv_policy": "flexprefill"})
    assert response.status_code == 200 and response.json()["kv"]["prefill_forwards"] == 1
    _assert_serves(server)
