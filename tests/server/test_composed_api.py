"""Composed presets over real HTTP with the embedded model: every valid pair generates, every refused pair
gets a 400 naming the pair and the reason (both endpoints, streaming too), `/v1/policies` lists the composed
presets and `/metrics` labels requests with the pair."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kvmux.policies.composed import pair_problem

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Count with me: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve,"
# every composable policy as a part, with budgets small enough for the short prompt to be cut
PARTS = {
    "full": "full",
    "flexprefill": {"preset": "flexprefill", "block_size": 16, "min_budget": 16},
    "hip": {"preset": "hip", "mask_k": 8, "block_size_q": 8, "sink_tokens": 2, "window": 8, "dense_layers": 0},
    "lazy_eviction": {"preset": "lazy_eviction", "budget": 16, "window": 2},
    "streaming_llm": {"preset": "streaming_llm", "sink_tokens": 2, "window": 8},
}
KEPT_AT_MOST = {"lazy_eviction": 16 + 2, "streaming_llm": 2 + 8}  # a decode part's bound, per layer
REFUSED = ("actqkv", "infiniretri")


@pytest.mark.parametrize("prefill", sorted(PARTS))
def test_every_valid_pair_generates(client, prefill):
    """The five pairs with this prefill part run at once (their decode steps batched where the policies allow)."""

    def complete(decode: str):
        body = {"ignore_eos": True, "kv_policy": {"prefill": PARTS[prefill], "decode": PARTS[decode]}}
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, extra_body=body)

    with ThreadPoolExecutor(len(PARTS)) as pool:
        answers = dict(zip(sorted(PARTS), pool.map(complete, sorted(PARTS)), strict=True))
    for decode, out in answers.items():
        kv, prompt_tokens = out.model_extra["kv"], out.usage.prompt_tokens
        assert out.usage.completion_tokens == 4 and prompt_tokens > KEPT_AT_MOST["lazy_eviction"]
        assert kv["policy"] == kv["preset"] == f"{prefill}+{decode}"
        # the last token is never fed back: the decode part saw the prompt and 3 generated tokens
        assert kv["tokens_seen"] == kv["decode"]["tokens_seen"] == prompt_tokens + 3
        assert kv["prefill"]["tokens_seen"] == prompt_tokens and kv["handover_tokens"] <= prompt_tokens
        assert kv["tokens_kept"] == kv["decode"]["tokens_kept"] <= KEPT_AT_MOST.get(decode, prompt_tokens + 3)


def _post(server, path: str, kv_policy, **body) -> httpx.Response:
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    return httpx.post(
        server.url + path, json={"model": MODEL, "max_tokens": 3, "kv_policy": kv_policy, **body}, timeout=120
    )


def _assert_refused(response: httpx.Response, prefill: str, decode: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "kv_policy", 400)
    assert f"prefill preset '{prefill}'" in error["message"] and f"decode preset '{decode}'" in error["message"]
    assert pair_problem(prefill, decode) in error["message"]


def test_every_refused_pair_gets_a_400_naming_the_pair_and_the_reason(live_server):
    pairs = {(a, b) for a in REFUSED for b in (*PARTS, *REFUSED)} | {(b, a) for a in REFUSED for b in PARTS}
    for prefill, decode in sorted(pairs):
        response = _post(live_server, "/v1/completions", {"prefill": prefill, "decode": decode})
        _assert_refused(response, prefill, decode)
    assert httpx.get(live_server.url + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_both_endpoints_serve_and_refuse_pairs(live_server, path, stream):
    _assert_refused(_post(live_server, path, {"prefill": "full", "decode": "actqkv"}, stream=stream), "full", "actqkv")
    policy = {"preset": "flexprefill+lazy_eviction", "decode": {"budget": 16}}
    response = _post(live_server, path, policy, stream=stream)
    assert response.status_code == 200, response.text
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
    else:
        kv = response.json()["kv"]
        assert kv["preset"] == "flexprefill+lazy_eviction" and kv["decode"]["budget"] == 16


def test_streamed_composed_chat_matches_the_whole_answer(client):
    policy = {"prefill": "flexprefill", "decode": PARTS["streaming_llm"]}
    args = dict(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**args, extra_body={"kv_policy": policy})
    chunks = list(
        client.chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True}, extra_body={"kv_policy": policy}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.model_extra["kv"]["policy"] == "flexprefill+streaming_llm"


def test_policies_list_the_composed_presets_and_metrics_label_the_pair(live_server, client):
    listed = {p["name"]: p for p in httpx.get(live_server.url + "/v1/policies", timeout=30).json()["data"]}
    for name in ("flexprefill+lazy_eviction", "flexprefill+streaming_llm", "flexprefill+hip"):
        prefill, decode = name.split("+")
        entry = listed[name]
        assert entry["policy"] == name and entry["composed"] == {"prefill": prefill, "decode": decode}
        assert entry["params"]["decode"] == listed[decode]["params"]
        assert set(entry["schema"]["properties"]) == {"prefill", "decode"}
    client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"kv_policy": "flexprefill+streaming_llm"}
    )
    scraped = httpx.get(live_server.url + "/metrics", timeout=30).text
    assert 'kvmux_generation_tokens_total{model="SmolLM2-135M-Instruct",policy="flexprefill+streaming_llm"}' in scraped
