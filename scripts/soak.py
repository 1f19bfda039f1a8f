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

The pieces: the server process (`soak_server.py`), the clients and the warm-up (`soak_clients.py`),
the run's record, checks and report (`soak_report.py`).

Usage:
    python scripts/soak.py --minutes 5 --clients 8 --faulty-fraction 0.1 --out docs/results/soak.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
from soak_clients import run_load, warm_up
from soak_report import Report, markdown, summarize, verdict
from soak_server import FAULTY_PRESET, faulty_config, free_port, rss_kib, start_server, wait_healthy, wait_idle


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
