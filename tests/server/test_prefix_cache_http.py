"""The prefix cache through the live server on the embedded model: several questions about one
document, a multi-turn chat, streamed usage, the opt-out, metrics, concurrent sharers, and bad input."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import pytest

from kvmux.policies.presets import load_presets
from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.serve import create_app
from tests.server.conftest import PRESETS, LiveServer, free_port

README = Path(__file__).resolve().parents[2] / "README.md"
DOCUMENT = README.read_text()[:2400]  # real prose and tables, ~600 tokens


@pytest.fixture(scope="module")
def cached_server(smollm):
    engine = Engine(
        smollm, load_presets(PRESETS), prefill_chunk_tokens=256, max_new_tokens=32, prefix_cache_bytes=1 << 30
    )
    with LiveServer(create_app(ServerConfig(), engine=engine), free_port()) as live:
        yield live


def complete(server: LiveServer, question: str, kv_policy=None, **extra) -> dict:
    body = {"prompt": f"{DOCUMENT}\n\nQuestion: {question}\nAnswer:", "max_tokens": 8, "temperature": 0, **extra}
    if kv_policy is not None:
        body["kv_policy"] = kv_policy
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("preset", ["full", "hip", "streaming_llm"])
def test_second_question_reuses_the_document(cached_server, preset):
    first = complete(cached_server, f"What is kvmux? ({preset})", preset)
    second = complete(cached_server, f"Which policies does it serve? ({preset})", preset)
    assert cached(second) > 0 and second["kv"]["cached_tokens"] == cached(second)
    assert cached(second) < second["usage"]["prompt_tokens"]
    assert first["kv"]["cached_tokens"] <= cached(second)
    fresh = complete(cached_server, f"Which policies does it serve? ({preset})", {"preset": preset, "cache": False})
    assert cached(fresh) == 0
    assert fresh["choices"][0]["text"] == second["choices"][0]["text"]  # exact reuse: the same greedy answer


def test_policies_that_read_the_question_are_not_cached(cached_server):
    complete(cached_server, "What is kvmux?", "infiniretri")
    assert cached(complete(cached_server, "What is kvmux?", "infiniretri")) == 0


def test_multi_turn_chat_hits_the_cache(cached_server):
    url = cached_server.url + "/v1/chat/completions"
    messages = [{"role": "user", "content": f"{DOCUMENT}\n\nSummarise this in one line."}]
    first = httpx.post(url, json={"messages": messages, "max_tokens": 8, "temperature": 0}, timeout=120).json()
    reply = first["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And in French?"}]
    body = {"messages": messages, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    last = json.loads(lines[-1][len("data: ") :])
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 8


def test_concurrent_sharers_see_only_their_own_tokens(cached_server):
    complete(cached_server, "Warm the cache.", "full")
    questions = ["What is kvmux?", "Who uses it?", "What does kvpress lack?", "What does vLLM lack?"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: complete(cached_server, q, "full"), questions))
    for question, body in zip(questions, together, strict=True):
        alone = complete(cached_server, question, {"preset": "full", "cache": False})
        assert cached(body) > 0
        assert body["choices"][0]["text"] == alone["choices"][0]["text"]


def test_metrics_and_bad_option(cached_server):
    complete(cached_server, "What is kvmux?", "full")
    complete(cached_server, "What is it for?", "full")
    text = httpx.get(cached_server.url + "/metrics").text
    hits = [line for line in text.splitlines() if line.startswith("kvmux_prefix_cache_hits_total{")]
    assert any('policy="full"' in line and float(line.split()[-1]) >= 1 for line in hits)
    assert "kvmux_prefix_cache_bytes{" in text
    bad = httpx.post(
        cached_server.url + "/v1/completions",
        json={"prompt": "hi", "max_tokens": 1, "kv_policy": {"preset": "full", "cache": "yes"}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "kv_policy.cache"


def test_cache_off_by_flag(smollm):
    engine = Engine(smollm, load_presets(PRESETS), prefill_chunk_tokens=256, max_new_tokens=8, prefix_cache_bytes=0)
    assert engine.prefix_cache is None
    with LiveServer(create_app(ServerConfig(), engine=engine), free_port()) as live:
        complete(live, "What is kvmux?", "full")
        assert cached(complete(live, "What is kvmux?", "full")) == 0


def test_embedded_chat_template_is_prefix_stable(smollm):
    """The next turn's rendered prompt extends the previous one, in text and (but for the seam) in tokens."""
    tok = smollm.tokenizer
    turn1 = [{"role": "user", "content": "Read this note. What is it about?"}]
    turn2 = turn1 + [{"role": "assistant", "content": "A short note."}, {"role": "user", "content": "Who wrote it?"}]
    text1 = tok.apply_chat_template(turn1, add_generation_prompt=True, tokenize=False)
    text2 = tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=False)
    assert text2.startswith(text1)
    ids1 = tok(text1, add_special_tokens=False)["input_ids"]
    ids2 = tok(text2, add_special_tokens=False)["input_ids"]
    common = next((i for i, (a, b) in enumerate(zip(ids1, ids2, strict=False)) if a != b), len(ids1))
    assert common >= len(ids1) - 1
