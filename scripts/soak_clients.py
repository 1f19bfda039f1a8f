"""The soak test's load (see scripts/soak.py): concurrent clients sending random requests over
every preset, chat and completions, streamed and not, some disconnecting mid-request, some using
the deliberately faulty policy; the warm-up before it and the RSS sampler during it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
from soak_report import Outcome, Report
from soak_server import FAULTY_PRESET, rss_kib

WORDS = (
    "river stone lamp garden winter signal copper market harbor violin meadow engine lantern orchard "
    "canyon ribbon thunder pepper window marble falcon saddle cedar compass glacier pillow quartz "
    "tunnel velvet walnut anchor basket candle desert feather ginger hammer island jacket kettle"
).split()
LONGEST_PROMPT_WORDS = 900
FAULTS = ["prefill", "decode", "after_decode", "stats", "close"]
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "Count from one to ten.",
    "What do bees make?",
    "Give a synonym for 'quick'.",
]


def make_prompt(rng: random.Random) -> tuple[str, str]:
    """(context text, question); about a fifth are long enough to take several prefill chunks."""
    n_words = rng.choice([8, 20, 40, 80, 300]) if rng.random() < 0.8 else rng.choice([600, LONGEST_PROMPT_WORDS])
    text = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return text, rng.choice(QUESTIONS)


def make_request(rng: random.Random, presets: list[str], max_tokens: int) -> tuple[str, str, dict]:
    weights = [4 if p in ("full", "streaming_llm") else 1 for p in presets]
    preset = rng.choices(presets, weights)[0]
    context, question = make_prompt(rng)
    tokens = rng.randint(max(1, max_tokens // 4), max_tokens)
    if rng.random() < 0.5:
        route = "/v1/chat/completions"
        body = {
            "messages": [{"role": "user", "content": f"{context}\n\n{question}"}],
            "max_tokens": tokens,
            "kv_policy": preset,
        }
    else:
        route = "/v1/completions"
        body = {"prompt": f"{context}\nQ: {question}\nA:", "max_tokens": tokens}
        body["kv_policy"] = {"preset": preset, "query": question}
    body["temperature"] = rng.choice([0.0, 0.7])
    body["seed"] = rng.randint(0, 2**31)
    return preset, route, body


def classify(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status in (429, 503):
        return "rejected"
    if status >= 400:
        return "client_error"
    return "completed"


async def run_stream(client: httpx.AsyncClient, route: str, body: dict, out: Outcome, stop_after: int | None) -> None:
    body = {**body, "stream": True}
    async with client.stream("POST", route, json=body) as response:
        out.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            out.result, out.error = classify(response.status_code), response.text[:300]
            return
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                code = int(chunk["error"].get("code") or 0)
                out.result, out.error = ("server_error" if code >= 500 else "client_error"), str(chunk["error"])[:300]
                return
            for choice in chunk.get("choices", []):
                out.tokens += 1
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
            if stop_after is not None and out.tokens >= stop_after:
                out.result = "disconnected"  # leaving the context closes the connection mid-stream
                return
        out.result = "completed" if done and out.finish_reason else "failed"
        if out.result == "failed":
            out.error = "stream ended without a finish_reason and [DONE]"


async def run_whole(client: httpx.AsyncClient, route: str, body: dict, out: Outcome, give_up_s: float | None) -> None:
    try:
        response = await asyncio.wait_for(client.post(route, json=body), timeout=give_up_s)
    except TimeoutError:
        out.result = "disconnected"  # the client gave up; the connection is closed under the request
        return
    out.status = response.status_code
    out.result = classify(response.status_code)
    if out.result == "completed":
        data = response.json()
        out.finish_reason = data["choices"][0]["finish_reason"]
        out.tokens = data["usage"]["completion_tokens"]
        if out.finish_reason not in ("stop", "length"):
            out.result, out.error = "failed", f"finish_reason {out.finish_reason!r}"
    else:
        out.error = response.text[:300]


def make_faulty(rng: random.Random, body: dict) -> tuple[str, dict]:
    """Turn a request into one whose policy fails on purpose (somewhere random)."""
    fault = rng.choice(FAULTS)
    spec = {"preset": FAULTY_PRESET, "fail_in": fault, "fail_after": rng.randint(0, 4)}
    return fault, {**body, "kv_policy": spec}


async def client_loop(url: str, seed: int, presets: list[str], deadline: float, args, report: Report) -> None:
    rng = random.Random(seed)
    timeout = httpx.Timeout(args.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        while time.monotonic() < deadline:
            preset, route, body = make_request(rng, presets, args.max_tokens)
            fault = None
            if rng.random() < args.faulty_fraction:
                fault, body = make_faulty(rng, body)
                preset = FAULTY_PRESET
            stream = rng.random() < 0.5
            disconnect = fault is None and rng.random() < args.disconnect_fraction
            out = Outcome(preset, route, stream, "disconnect" if disconnect else "complete", fault)
            started = time.monotonic()
            try:
                if stream:
                    stop_after = rng.randint(1, max(1, body["max_tokens"] // 2)) if disconnect else None
                    await run_stream(client, route, body, out, stop_after)
                else:
                    give_up = rng.uniform(0.5, 3.0) if disconnect else None
                    await run_whole(client, route, body, out, give_up)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
                out.result, out.error = "failed", f"{type(exc).__name__}: {exc}"[:300]
            if out.fault is not None and out.result == "server_error":
                out.result = "faulted"  # failed on purpose, alone: what a faulty request may do
            out.seconds = round(time.monotonic() - started, 3)
            report.outcomes.append(out)


async def sample_rss(pid: int, report: Report, stop: asyncio.Event) -> None:
    while not stop.is_set():
        report.rss_peak_kib = max(report.rss_peak_kib, rss_kib(pid))
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            pass


async def run_load(url: str, pid: int, presets: list[str], args, report: Report) -> None:
    deadline = time.monotonic() + args.minutes * 60
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, report, stop))
    started = time.monotonic()
    await asyncio.gather(
        *(client_loop(url, args.seed + i, presets, deadline, args, report) for i in range(args.clients))
    )
    report.load_seconds = round(time.monotonic() - started, 1)
    stop.set()
    await sampler


def warm_up(url: str, presets: list[str]) -> None:
    """Every preset once on each route, streamed and not, at the load's longest prompt, so that
    lazy allocations and the largest activation buffers exist before the idle RSS is measured."""
    longest = " ".join(WORDS[i % len(WORDS)] for i in range(LONGEST_PROMPT_WORDS))
    with httpx.Client(base_url=url, timeout=900) as client:
        for i, preset in enumerate(presets):
            chat = {"messages": [{"role": "user", "content": f"{longest}\n\nSay hello."}], "kv_policy": preset}
            text = {"prompt": f"{longest}\nQ: name?\nA:", "kv_policy": {"preset": preset, "query": "name?"}}
            for route, body in (("/v1/chat/completions", chat), ("/v1/completions", text)):
                response = client.post(route, json={**body, "max_tokens": 4, "stream": bool(i % 2)})
                if response.status_code != 200:
                    raise RuntimeError(f"warm-up with {preset} failed: {response.status_code} {response.text[:300]}")
