"""Bounded soak test of `kvmux serve`: concurrent clients mixing presets, streaming and not, some
disconnecting mid-request, optionally some sending requests whose policy fails on purpose;
checks for 5xx on healthy requests, unfinished requests and memory growth.

The script starts the server itself (`kvmux serve` on a free 127.0.0.1 port, the embedded model
unless --serve-arg says otherwise), warms it up with one request per preset, records the server
process's idle RSS, runs the load for --minutes, waits until the server is idle again, records RSS
again, stops the server with SIGTERM and writes a Markdown report (and a JSON file).

With --faulty-fraction F, the server also loads the deliberately faulty policy of the test suite
(`tests/faulty_policy.py`, through `policy_modules`) as preset `faulty`, and that fraction of
requests use it with a random fault (in the prefill, a decode step's attention or eviction hook, the
stats, or the clean-up): those may fail alone, every other request must still complete.

Usage:
    python scripts/soak.py --minutes 5 --clients 8 --faulty-fraction 0.1 --out docs/results/soak.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from soak_report import markdown, summarize, verdict

WORDS = (
    "river stone lamp garden winter signal copper market harbor violin meadow engine lantern orchard "
    "canyon ribbon thunder pepper window marble falcon saddle cedar compass glacier pillow quartz "
    "tunnel velvet walnut anchor basket candle desert feather ginger hammer island jacket kettle"
).split()
LONGEST_PROMPT_WORDS = 900
REPO = Path(__file__).resolve().parents[1]
FAULTY_PRESET = "faulty"
FAULTS = ["prefill", "decode", "after_decode", "stats", "close"]
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "Count from one to ten.",
    "What do bees make?",
    "Give a synonym for 'quick'.",
]


@dataclass
class Outcome:
    """One client request as the client saw it."""

    preset: str
    route: str
    stream: bool
    plan: str  # "complete" or "disconnect"
    fault: str | None = None  # where a faulty request fails on purpose (None: a healthy request)
    status: int | None = None  # None: no response (connection error)
    result: str = ""  # completed | disconnected | rejected | client_error | server_error | failed
    finish_reason: str | None = None
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Report:
    args: dict
    presets: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    rss_startup_kib: int = 0
    rss_idle_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_idle_after_kib: int = 0
    server_metrics: dict[str, float] = field(default_factory=dict)
    metrics_available: bool = False
    exit_code: int | None = None
    shutdown_seconds: float | None = None
    load_seconds: float = 0.0


# -- the server process ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def kvmux_command() -> str:
    local = Path(sys.executable).parent / "kvmux"
    return str(local) if local.exists() else (shutil.which("kvmux") or "kvmux")


def faulty_config(folder: Path) -> Path:
    """A server config whose presets are the repository's plus `faulty` (policy from the tests)."""
    presets = folder / "policies"
    presets.mkdir(parents=True, exist_ok=True)
    for path in (REPO / "configs" / "policies").glob("*.yaml"):
        shutil.copy(path, presets / path.name)
    (presets / "faulty.yaml").write_text(
        f"name: {FAULTY_PRESET}\npolicy: faulty\ndescription: fails on purpose\nparams: {{fail_in: decode}}\n"
    )
    config = folder / "server.yaml"
    config.write_text(f"presets_dir: {presets}\npolicy_modules: [tests.faulty_plugin]\n")
    return config


def start_server(port: int, extra: list[str], log_path: Path, threads: int | None) -> subprocess.Popen:
    argv = [kvmux_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra]
    # the repository on the path: `policy_modules` may name the test suite's faulty policy
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(paths)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server process
    log = log_path.open("w")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} during start-up")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def scrape(url: str) -> dict[str, float] | None:
    """kvmux's own metrics summed over labels other than `reason` (None when /metrics is absent)."""
    response = httpx.get(url + "/metrics", timeout=10)
    if response.status_code != 200:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            if not s.name.startswith("kvmux_"):
                continue
            key = s.name + (f"[{s.labels['reason']}]" if "reason" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
            if s.labels.get("policy") == "faulty":  # the faulty requests' share, to tell them apart
                out[key + "{faulty}"] = out.get(key + "{faulty}", 0.0) + s.value
    return out


def wait_idle(url: str, timeout_s: float) -> dict[str, float] | None:
    """Wait until the server reports nothing running or waiting; returns the last scrape."""
    deadline = time.monotonic() + timeout_s
    metrics = scrape(url)
    while metrics is not None and time.monotonic() < deadline:
        if metrics.get("kvmux_requests_running", 0) == 0 and metrics.get("kvmux_requests_waiting", 0) == 0:
            break
        time.sleep(0.5)
        metrics = scrape(url)
    if metrics is None:
        time.sleep(3.0)  # without metrics: give cancelled requests time to be dropped
    return metrics


# -- the clients -----------------------------------------------------------------------------------
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens a client asks for")
    parser.add_argument("--disconnect-fraction", type=float, default=0.25)
    parser.add_argument("--faulty-fraction", type=float, default=0.0, help="share of requests that fail on purpose")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS for the server")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `kvmux serve` argument (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="Markdown report (default: print it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw outcomes as JSON")
    args = parser.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvmux-soak-{port}.log"
    serve_args = list(args.serve_arg)
    if args.faulty_fraction > 0:
        folder = Path(tempfile.mkdtemp(prefix="kvmux-soak-"))
        serve_args += ["--config", str(faulty_config(folder))]
    proc = start_server(port, serve_args, log_path, args.torch_threads)
    report = Report(args=vars(args) | {"out": str(args.out), "json": str(args.json)}, presets=[])
    try:
        wait_healthy(url, proc, timeout_s=300)
        report.rss_startup_kib = rss_kib(proc.pid)
        listed = [p["name"] for p in httpx.get(url + "/v1/policies", timeout=30).json()["data"]]
        report.presets = [name for name in listed if name != FAULTY_PRESET]
        warm_up(url, report.presets)
        wait_idle(url, timeout_s=60)
        report.rss_idle_before_kib = rss_kib(proc.pid)
        print(f"server pid {proc.pid} on {url}; presets {report.presets}; load for {args.minutes} min", flush=True)
        asyncio.run(run_load(url, proc.pid, report.presets, args, report))
        metrics = wait_idle(url, timeout_s=120)
        report.metrics_available = metrics is not None
        report.server_metrics = metrics or {}
        report.rss_idle_after_kib = rss_kib(proc.pid)
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        report.exit_code = proc.wait(timeout=120)
        report.shutdown_seconds = round(time.monotonic() - stopping, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    summary = summarize(report)
    text = markdown(report, summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        raw = {"summary": summary, "report": {**asdict(report), "outcomes": [asdict(o) for o in report.outcomes]}}
        args.json.write_text(json.dumps(raw, indent=1))
    print(f"server log: {log_path}")
    return 0 if all(ok for _, ok in verdict(summary, report)) else 1


if __name__ == "__main__":
    sys.exit(main())
