"""`kvmux bench --url`: serving load against a running OpenAI-compatible server.

Follows what `vllm bench serve` measures (vllm/benchmarks/serve.py): every concurrency level
sends a fixed number of streamed requests, all released at once (request rate = inf) but at most
`concurrency` in flight; each has the same prompt length and exactly `max_tokens` output tokens
(`ignore_eos`, temperature 0) and asks for the usage chunk (`stream_options.include_usage`).
Per level: completed/failed requests, requests/s, output and total tokens/s, and mean, median
(p50), p99 and stdev of TTFT, TPOT (time per output token after the first), ITL (gaps between
successive streamed chunks) and end-to-end latency, all in milliseconds; plus the distinct
error messages. A request counts as failed if it does not return HTTP 200 or streams no text.

Prompt length: the server's tokenizer is not available to the client, so prompts are built from
a fixed list of common words and calibrated once against the server's own `usage.prompt_tokens`;
the prompt tokens actually seen are reported. Every request gets its own word order (no two
prompts share a prefix beyond chance), as vLLM's random dataset does.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from kvmux.evals.bench.prompts import make_prompt


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation, as numpy computes it; None if empty."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def distribution(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean / median (p50) / p99 / std / max of `values` (seconds), scaled (default: to ms)."""
    if not values:
        return {"mean": None, "median": None, "p99": None, "std": None, "max": None}
    arr = np.asarray(values, dtype=float) * scale
    return {
        "mean": float(arr.mean()),
        "median": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
        "std": float(arr.std()),
        "max": float(arr.max()),
    }


def inter_token_latencies(chunk_times: list[float]) -> list[float]:
    """Gaps between successive content chunks (the first chunk's latency is the TTFT, not an ITL)."""
    return [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]


@dataclass
class RequestRecord:
    """The client's view of one streamed request (times from time.perf_counter)."""

    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def summarize_level(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    """vLLM-style summary of one concurrency level."""
    done = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            message = r.error or "no text streamed"
            errors[message] = errors.get(message, 0) + 1
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": [{"message": m, "count": c} for m, c in sorted(errors.items(), key=lambda kv: -kv[1])],
        "duration_s": duration_s,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(out_tokens + in_tokens),
        "total_output_tokens": out_tokens,
        "mean_prompt_tokens": in_tokens / len(done) if done else None,
        "ttft_ms": distribution([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": distribution([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": distribution([gap for r in done for gap in inter_token_latencies(r.chunk_times)]),
        "e2el_ms": distribution([r.latency for r in done]),
    }


@dataclass(frozen=True)
class LoadSettings:
    prompt_tokens: int
    max_tokens: int
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    num_requests: int | None = None  # per level; default max(8, 2 * concurrency)
    endpoint: str = "completions"  # or "chat"
    timeout_s: float = 600.0
    seed: int = 0

    def requests_for(self, concurrency: int) -> int:
        return self.num_requests or max(8, 2 * concurrency)


def _body(settings: LoadSettings, model: str, prompt: str, kv_policy: Any, max_tokens: int, stream: bool) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    if settings.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if kv_policy is not None:
        body["kv_policy"] = kv_policy
    return body


def _path(settings: LoadSettings) -> str:
    return "/v1/chat/completions" if settings.endpoint == "chat" else "/v1/completions"


def _chunk_text(chunk: dict) -> str:
    parts = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        parts.append(choice.get("text") or delta.get("content") or "")
    return "".join(parts)


async def stream_request(client: httpx.AsyncClient, path: str, body: dict) -> RequestRecord:
    """Send one streamed request; record when each text chunk arrives and the final usage."""
    record = RequestRecord(start=time.perf_counter())
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raw = (await response.aread()).decode(errors="replace")
                try:
                    message = json.loads(raw)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = raw[:200]
                record.error = f"HTTP {response.status_code}: {message}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if _chunk_text(chunk):
                    record.chunk_times.append(time.perf_counter())
                usage = chunk.get("usage")
                if usage:
                    record.output_tokens = int(usage.get("completion_tokens") or 0)
                    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    except (httpx.HTTPError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.end = time.perf_counter()
    if record.ok and not record.output_tokens:
        record.output_tokens = len(record.chunk_times)  # no usage chunk: count chunks
    return record


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def calibrate_words(
    client: httpx.AsyncClient, settings: LoadSettings, model: str, kv_policy: Any
) -> tuple[int, int | None]:
    """Words needed for `prompt_tokens` tokens, from the server's token counts: (words, tokens seen).

    If the server refuses the request, the estimate stands uncalibrated (tokens seen = None).
    """
    words, seen = max(1, int(settings.prompt_tokens / 1.3)), None
    for attempt in range(3):
        body = _body(settings, model, make_prompt(words, settings.seed - 1 - attempt), kv_policy, 1, stream=False)
        response = await client.post(_path(settings), json=body)
        if response.status_code != 200:  # the measured requests will fail alike and report why
            return words, None
        seen = int((response.json().get("usage") or {}).get("prompt_tokens") or 0) or None
        if seen is None or abs(seen - settings.prompt_tokens) <= max(2, settings.prompt_tokens // 100):
            break
        words = max(1, round(words * settings.prompt_tokens / seen))
    return words, seen


def level_prompt(words: int, seed: int, concurrency: int, index: int) -> str:
    """The prompt of request `index` at a concurrency level (also what the generate_batch peer sends)."""
    return make_prompt(words, seed * 100_003 + concurrency * 1_009 + index)


async def run_level(
    client: httpx.AsyncClient, settings: LoadSettings, model: str, words: int, kv_policy: Any, concurrency: int
) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    count = settings.requests_for(concurrency)

    async def one(index: int) -> RequestRecord:
        prompt = level_prompt(words, settings.seed, concurrency, index)
        async with gate:
            return await stream_request(
                client, _path(settings), _body(settings, model, prompt, kv_policy, settings.max_tokens, True)
            )

    start = time.perf_counter()
    records = await asyncio.gather(*(one(i) for i in range(count)))
    return {"concurrency": concurrency, **summarize_level(list(records), time.perf_counter() - start)}


async def run_load(
    url: str,
    settings: LoadSettings,
    kv_policies: dict[str, Any] | None = None,
    model: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    progress=None,
) -> dict[str, Any]:
    """All concurrency levels for each kv_policy (name -> request value; {None: None} = server default)."""
    say = progress or (lambda message: None)
    base = url.rstrip("/").removesuffix("/v1")
    policies = kv_policies or {"(server default)": None}
    rows = []
    limits = httpx.Limits(max_connections=max(settings.concurrency) + 2)
    async with httpx.AsyncClient(
        base_url=base, timeout=settings.timeout_s, transport=transport, limits=limits
    ) as client:
        model = model or await first_model(client)
        for name, kv_policy in policies.items():
            words, seen = await calibrate_words(client, settings, model, kv_policy)
            say(f"{name}: {words} words -> {seen} prompt tokens (target {settings.prompt_tokens})")
            for concurrency in settings.concurrency:
                level = await run_level(client, settings, model, words, kv_policy, concurrency)
                target = settings.prompt_tokens
                rows.append(
                    {"preset": name, "kv_policy": kv_policy, "prompt_tokens_target": target, "prompt_words": words}
                    | level
                )
                ttft = level["ttft_ms"]["median"] or 0.0
                say(
                    f"{name} c={concurrency}: {level['completed']}/{level['num_requests']} ok, "
                    f"{level['output_throughput'] or 0:.1f} out tok/s, TTFT p50 {ttft:.0f} ms"
                )
    return {
        "kind": "kvmux-serve-load",
        "version": 1,
        "url": base,
        "model": model,
        "settings": {
            "prompt_tokens": settings.prompt_tokens,
            "max_tokens": settings.max_tokens,
            "concurrency": list(settings.concurrency),
            "num_requests": {c: settings.requests_for(c) for c in settings.concurrency},
            "endpoint": settings.endpoint,
            "ignore_eos": True,
            "temperature": 0.0,
            "request_rate": "inf",
            "seed": settings.seed,
        },
        "results": rows,
    }
