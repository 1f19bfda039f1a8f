"""Replicated kvmux on Ray Serve.

Without Ray: the affinity key of a request, a request run through an app by the forwarding layer,
the merged metrics of several replicas, the config and the `kvmux serve` flags.
With Ray (a local instance: 2 CPUs, no dashboard, a small object store): two replicas of the
embedded model behind one endpoint, used over HTTP with the official openai client. Both replicas
serve, streaming included; six questions about one document land on one replica (and, once the
server reports cached prompt tokens or prefix-cache hits, hit its cache there only); a replica
killed mid-run fails only its own in-flight requests, cleanly, while Serve replaces it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families

import kvmux.evals
from kvmux.cli import _config_from_args, build_parser
from kvmux.models.loader import ModelSpec
from kvmux.server.config import ServerConfig, load_server_config
from kvmux.server.metrics import Metrics
from kvmux.server.replicas.affinity import affinity_key
from kvmux.server.replicas.forwarding import ForwardedRequest, run_asgi
from kvmux.server.replicas.metrics_merge import merge_expositions
from tests.server.conftest import free_port

DOCUMENT = (Path(kvmux.evals.__file__).parent / "corpus" / "pride_and_prejudice.txt").read_text()[3000:5000]
QUESTIONS = [
    "Who is mentioned first?",
    "Where does the scene take place?",
    "What is the mood?",
    "Who speaks last?",
    "What is decided?",
    "Summarise it in three words.",
]
REPLICA = "x-kvmux-replica"


def chat_body(messages: list[dict], **extra) -> bytes:
    return json.dumps({"model": "m", "messages": messages, **extra}).encode()


def key_of(body: bytes, headers: dict[str, str] | None = None, mode: str = "prompt") -> str | None:
    return affinity_key(headers or {}, body, mode, 512)


# -- without Ray ---------------------------------------------------------------------------------


def test_a_session_header_decides_and_modes_limit_the_sources():
    body = chat_body([{"role": "user", "content": "hello"}])
    assert key_of(body, {"x-session-id": "abc"}) == "session:abc"
    assert key_of(body, {"x-session-id": "abc"}, mode="session") == "session:abc"
    assert key_of(body, mode="session") is None
    assert key_of(body, {"x-session-id": "abc"}, mode="off") is None
    assert key_of(body).startswith("prompt:")


def test_questions_about_one_document_share_a_key_and_other_documents_do_not():
    system = [{"role": "system", "content": DOCUMENT}]
    keys = {key_of(chat_body([*system, {"role": "user", "content": q}])) for q in QUESTIONS}
    assert len(keys) == 1
    inline = {key_of(chat_body([{"role": "user", "content": f"{DOCUMENT}\nQuestion: {q}"}])) for q in QUESTIONS}
    assert len(inline) == 1 and inline != keys
    other = chat_body([{"role": "system", "content": DOCUMENT[::-1]}, {"role": "user", "content": QUESTIONS[0]}])
    assert key_of(other) not in keys
    with_policy = chat_body([*system, {"role": "user", "content": QUESTIONS[0]}], kv_policy="streaming_llm")
    assert key_of(with_policy) not in keys  # cached states are shared within one policy only


def test_a_growing_chat_keeps_its_key():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    first = key_of(chat_body(turns))
    turns += [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    assert key_of(chat_body(turns)) == first
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, turns[1]]
    assert key_of(chat_body(parts)) == first  # content parts read as their text


def test_completion_prompts_text_token_ids_and_bodies_without_a_prompt():
    prompt = DOCUMENT[:600]
    assert key_of(json.dumps({"prompt": prompt + "A?"}).encode()) == key_of(json.dumps({"prompt": prompt}).encode())
    assert key_of(json.dumps({"prompt": [prompt, "x"]}).encode()) == key_of(json.dumps({"prompt": prompt}).encode())
    ids = list(range(300))
    assert key_of(json.dumps({"prompt": ids + [1]}).encode()) == key_of(json.dumps({"prompt": ids}).encode())
    assert key_of(json.dumps({"prompt": [1, 2]}).encode()) != key_of(json.dumps({"prompt": [2, 1]}).encode())
    for body in (b"not json", b"[1, 2]", b"{}", json.dumps({"prompt": []}).encode(), b""):
        assert key_of(body) is None


def tiny_app(seen: dict[str, str]) -> FastAPI:
    """A JSON route, and at /events an event stream that, after two events, waits for what comes next."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        return {"got": (await request.json())["x"]}

    async def events(scope, receive, send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(2):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
        seen["next"] = (await receive())["type"]

    app.mount("/events", events)
    return app


def test_forwarding_answers_whole_or_streamed_and_tells_the_app_when_the_caller_left():
    seen: dict[str, str] = {}
    app = tiny_app(seen)
    extra = [(b"x-kvmux-replica", b"r1")]

    async def scenario():
        post = ForwardedRequest("POST", "/echo", b"", [(b"content-type", b"application/json")], b'{"x": 7}')
        parts = [p async for p in run_asgi(app, post, extra)]
        assert len(parts) == 1 and not parts[0].more and parts[0].status == 200
        assert json.loads(parts[0].body) == {"got": 7} and (b"x-kvmux-replica", b"r1") in parts[0].headers
        missing = [p async for p in run_asgi(app, ForwardedRequest("GET", "/nowhere"))]
        assert [p.status for p in missing] == [404]
        stream = run_asgi(app, ForwardedRequest("GET", "/events/"), extra)
        first = await anext(stream)
        assert first.status == 200 and first.more and first.body == b"data: 0\n\n"
        assert (await anext(stream)).status is None  # only the first part carries status and headers
        await stream.aclose()  # the caller leaves mid-stream

    asyncio.run(scenario())
    assert seen["next"] == "http.disconnect"  # as under uvicorn when the client leaves


def test_replica_metrics_carry_their_label_and_merge_into_one_exposition():
    single = Metrics("m")
    single.record_rejected("queue_full", "full")
    assert b"replica=" not in single.render()[0]  # a single process's output is unchanged
    texts = []
    for replica in ("r1", "r2"):
        metrics = Metrics("m")
        metrics.replica = replica
        metrics.record_rejected("queue_full", "full")
        texts.append(metrics.render()[0].decode())
    merged = merge_expositions(texts).decode()
    assert merged.count("# HELP kvmux_request_outcomes_total ") == 1
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    replicas = {s.labels["replica"] for s in families["kvmux_request_outcomes"].samples}
    assert replicas == {"r1", "r2"}


def test_serve_flags_choose_between_one_process_and_ray_serve():
    parse = build_parser().parse_args
    assert not _config_from_args(parse(["serve"])).replicas.distributed
    assert not _config_from_args(parse(["serve", "--replicas", "1"])).replicas.distributed
    two = _config_from_args(parse(["serve", "--replicas", "2"])).replicas
    assert two.distributed and two.num_replicas == 2
    joined = _config_from_args(parse(["serve", "--ray-address", "head:6379"])).replicas
    assert joined.distributed and joined.ray_address == "head:6379" and joined.num_replicas == 1
    with pytest.raises(ValueError, match="min_replicas"):
        ServerConfig(replicas={"autoscaling": {"min_replicas": 3, "max_replicas": 2}})


def test_unquoted_yaml_off_means_affinity_off(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("replicas: {num_replicas: 2, affinity: off}\n")  # YAML 1.1 reads `off` as false
    assert load_server_config(path).replicas.affinity == "off"
    with pytest.raises(ValueError, match="affinity"):
        ServerConfig(replicas={"affinity": True})


# -- with Ray ------------------------------------------------------------------------------------


def test_serve_options_follow_kvmux_admission_limits():
    pytest.importorskip("ray.serve")
    from kvmux.server.replicas.deploy import ingress_options, replica_options

    config = ServerConfig(max_active_sessions=3, max_queued_requests=5, replicas={"num_replicas": 2, "num_gpus": 1})
    options = replica_options(config)
    assert options["max_ongoing_requests"] == 8 and options["max_queued_requests"] == 5
    assert options["num_replicas"] == 2 and options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert ingress_options(config)["max_ongoing_requests"] >= 2 * 8 + 5
    scaled = ServerConfig(replicas={"autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    options = replica_options(scaled)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2.0}


@pytest.fixture(scope="module")
def cluster():
    """Two replicas of the embedded model on a local Ray instance; yields the endpoint's base URL."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from kvmux.server.replicas.deploy import APP_NAME, build_application

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(
            model=ModelSpec(prefill_chunk_tokens=512),
            max_new_tokens=256,
            shutdown_grace_s=2.0,
            replicas={"num_replicas": 2, "num_cpus": 0.5},
        )
        serve.run(build_application(config), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture()
def client(cluster):
    import openai

    return openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=120)


def replica_of_session(client, session: str) -> str:
    raw = client.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=1, extra_headers={"X-Session-Id": session}
    )
    return raw.headers[REPLICA]


def sessions_by_replica(client, prefix: str) -> dict[str, str]:
    """{replica id: a session id the router sends there}, for every replica that answers."""
    found: dict[str, str] = {}
    for i in range(24):
        found.setdefault(replica_of_session(client, f"{prefix}-{i}"), f"{prefix}-{i}")
        if len(found) == 2:
            break
    return found


def scrape(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text)}


def test_two_replicas_serve_the_openai_api_streaming_included(cluster, client):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    replicas = sessions_by_replica(client, "spread")
    assert len(replicas) == 2  # both replicas serve
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    bad = httpx.post(cluster + "/v1/completions", json={"prompt": "hi", "max_tokens": "ten"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"  # kvmux's own validation
    outcomes = scrape(cluster)["kvmux_request_outcomes"].samples
    assert {s.labels["replica"] for s in outcomes} == set(replicas)  # every replica's series, labelled


def test_questions_about_one_document_land_on_one_replica_and_hit_its_cache(cluster, client):
    before = scrape(cluster)
    answers = []
    for question in QUESTIONS:
        raw = client.chat.completions.with_raw_response.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "system", "content": DOCUMENT}, {"role": "user", "content": question}],
            max_tokens=3,
            temperature=0,
        )
        answers.append((raw.headers[REPLICA], raw.http_response.json()))
    replicas = {replica for replica, _ in answers}
    assert len(replicas) == 1
    # once the server reports cached prompt tokens, every later question must reuse the document's prefix
    details = [body["usage"].get("prompt_tokens_details") or {} for _, body in answers[1:]]
    assert all(d["cached_tokens"] > 0 for d in details if "cached_tokens" in d)
    hits = "kvmux_prefix_cache_hits"
    if hits in before:  # once the server counts prefix-cache hits: they rise on that replica only
        after = scrape(cluster)

        def per_replica(families) -> dict[str, float]:
            totals: dict[str, float] = {}
            for s in families[hits].samples:
                if s.name.endswith("_total"):
                    totals[s.labels["replica"]] = totals.get(s.labels["replica"], 0.0) + s.value
            return totals

        rise = {r: v - per_replica(before).get(r, 0.0) for r, v in per_replica(after).items()}
        assert rise.pop(replicas.pop()) > 0 and not any(rise.values())

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    seen = set()
    for turn in ("Another one?", "And one more?"):  # a growing chat stays where it started
        raw = client.chat.completions.with_raw_response.create(
            model="SmolLM2-135M-Instruct", messages=chat, max_tokens=3
        )
        seen.add(raw.headers[REPLICA])
        chat += [
            {"role": "assistant", "content": raw.parse().choices[0].message.content},
            {"role": "user", "content": turn},
        ]
    assert len(seen) == 1


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(cluster, client):
    import openai
    import ray

    (doomed, doomed_session), (healthy, healthy_session) = sessions_by_replica(client, "fault").items()
    long = {"model": "SmolLM2-135M-Instruct", "prompt": "Count:", "max_tokens": 160, "temperature": 0}
    long["extra_body"] = {"ignore_eos": True}
    results: dict[str, object] = {}
    streaming = {"doomed_stream": threading.Event(), "healthy_stream": threading.Event()}

    def stream(name: str, session: str) -> None:
        try:
            chunks = client.completions.create(
                **long, stream=True, stream_options={"include_usage": True}, extra_headers={"X-Session-Id": session}
            )
            for chunk in chunks:
                streaming[name].set()
                results[name] = chunk
        except openai.APIError as exc:
            results[name] = exc

    def whole(name: str, session: str) -> None:
        try:
            results[name] = client.completions.create(**long, extra_headers={"X-Session-Id": session})
        except openai.APIError as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=stream, args=("doomed_stream", doomed_session)),
        threading.Thread(target=whole, args=("doomed_whole", doomed_session)),
        threading.Thread(target=stream, args=("healthy_stream", healthy_session)),
    ]
    for thread in threads:
        thread.start()
    assert all(started.wait(120) for started in streaming.values())
    time.sleep(0.5)  # the non-streaming request reaches its replica too
    ray.kill(ray.get_actor(f"SERVE_REPLICA::kvmux#KvmuxReplica#{doomed}", namespace="serve"), no_restart=True)
    for thread in threads:
        thread.join(150)
        assert not thread.is_alive()  # every request ends: an answer or an error, never a hang

    assert isinstance(results["doomed_stream"], openai.APIError)  # the SSE error event after the headers
    assert "replica" in str(results["doomed_stream"])
    assert isinstance(results["doomed_whole"], openai.APIStatusError)
    assert results["doomed_whole"].status_code == 503
    assert results["healthy_stream"].usage.completion_tokens == 160  # the other replica's request: untouched

    for _ in range(3):  # requests accepted now succeed, the doomed replica's session included
        assert replica_of_session(client, doomed_session) != doomed
    deadline, seen, probe = time.monotonic() + 150, set(), 0
    while time.monotonic() < deadline and not seen - {doomed, healthy}:  # Serve starts a replacement
        probe += 1
        seen.add(replica_of_session(client, f"after-{probe}"))
        time.sleep(0.5)
    assert doomed not in seen and seen - {doomed, healthy}
