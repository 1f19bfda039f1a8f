"""The soak test's record (`Report`, one `Outcome` per request), its summary, pass/fail checks and
Markdown report (see scripts/soak.py)."""

from __future__ import annotations

import os
import platform
from collections import Counter
from dataclasses import dataclass, field


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
    """The whole run: its arguments, every outcome, the server's RSS, metrics and exit."""

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


def summarize(report: Report) -> dict:
    outcomes = report.outcomes
    by_result = Counter(o.result for o in outcomes)
    healthy = [o for o in outcomes if o.fault is None]
    faulty = [o for o in outcomes if o.fault is not None]
    accepted = [o for o in healthy if o.status == 200 or o.result == "disconnected"]
    clean = [o for o in accepted if o.result in ("completed", "disconnected")]
    growth = (report.rss_idle_after_kib - report.rss_idle_before_kib) / max(report.rss_idle_before_kib, 1)
    metrics = report.server_metrics
    finished = sum(v for k, v in metrics.items() if k.startswith("kvmux_request_outcomes_total[finished_"))
    return {
        "requests": len(outcomes),
        "by_result": dict(by_result),
        "server_errors_5xx": by_result.get("server_error", 0),
        "accepted": len(accepted),
        "accepted_clean": len(clean),
        "rss_growth": round(growth, 4),
        "server_finished": finished if report.metrics_available else None,
        "server_cancelled": metrics.get("kvmux_request_outcomes_total[cancelled]")
        if report.metrics_available
        else None,
        "server_errors": metrics.get("kvmux_request_outcomes_total[error]") if report.metrics_available else None,
        "server_errors_faulty": metrics.get("kvmux_request_outcomes_total[error]{faulty}", 0.0),
        "healthy_requests": len(healthy),
        "faulty_requests": len(faulty),
        "faulty_by_result": dict(Counter(o.result for o in faulty)),
        "faulty_by_fault": dict(Counter(o.fault for o in faulty)),
        "server_running_after": metrics.get("kvmux_requests_running") if report.metrics_available else None,
        "server_waiting_after": metrics.get("kvmux_requests_waiting") if report.metrics_available else None,
        "completion_tokens": sum(o.tokens for o in outcomes),
    }


def verdict(summary: dict, report: Report) -> list[tuple[str, bool]]:
    checks = [
        (
            "zero 5xx on healthy requests (and no internal error inside their streams)",
            summary["server_errors_5xx"] == 0,
        ),
        (
            "every accepted healthy request completed or was cleanly cancelled",
            summary["accepted"] == summary["accepted_clean"],
        ),
        ("idle RSS after the load within 10% of idle RSS before", summary["rss_growth"] <= 0.10),
        ("the server exited 0 on SIGTERM", report.exit_code == 0),
    ]
    if report.metrics_available:
        idle = summary["server_running_after"] == 0 and summary["server_waiting_after"] == 0
        checks.append(("the server reports nothing running or waiting afterwards", idle))
        healthy_errors = (summary["server_errors"] or 0) - summary["server_errors_faulty"]
        checks.append(("no healthy request ended in a server-side error", healthy_errors == 0))
        if summary["faulty_requests"]:
            # each faulty request fails at most itself: server-side errors never exceed the faulty requests
            checks.append(
                (
                    "server-side errors come from faulty requests only",
                    summary["server_errors_faulty"] <= summary["faulty_requests"],
                )
            )
    return checks


def markdown(report: Report, summary: dict) -> str:
    a = report.args
    mib = lambda kib: f"{kib / 1024:.1f} MiB"  # noqa: E731
    lines = [
        "# Soak test: `kvmux serve` under mixed concurrent load",
        "",
        f"`python scripts/soak.py --minutes {a['minutes']} --clients {a['clients']} --max-tokens {a['max_tokens']}"
        f" --disconnect-fraction {a['disconnect_fraction']} --seed {a['seed']}"
        + (f" --faulty-fraction {a['faulty_fraction']}" if a.get("faulty_fraction") else "")
        + (f" --torch-threads {a['torch_threads']}" if a["torch_threads"] else "")
        + "".join(f" --serve-arg={x}" for x in a["serve_arg"])
        + "`",
        "",
        f"Embedded model on CPU ({platform.machine()}, {os.cpu_count()} cores, shared with other work), "
        f"{a['clients']} clients for {report.load_seconds:.0f} s of load, presets {', '.join(report.presets)} "
        "(`full` and `streaming_llm` weighted 4x), half chat and half completions, half streamed; "
        f"{a['disconnect_fraction']:.0%} of requests disconnect early (a stream closed after a few chunks, "
        "or a whole-response request abandoned after 0.5-3 s). The idle RSS before the load is read after a "
        "warm-up that runs every preset once on each route at the load's longest prompt; the idle RSS after "
        "it once the server reports (or, without /metrics, is given 3 s to reach) nothing running or waiting."
        + (
            f" {a['faulty_fraction']:.0%} of requests use preset `faulty` (the test suite's deliberately faulty "
            "policy, loaded through `policy_modules`), failing on purpose in the prefill, a decode step's attention "
            "or eviction hook, its stats or its clean-up; they may fail alone, every other request must not."
            if a.get("faulty_fraction")
            else ""
        ),
        "",
        "## Checks",
        "",
        "| check | result |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {'pass' if ok else '**FAIL**'} |" for name, ok in verdict(summary, report)]
    lines += [
        "",
        "## Numbers",
        "",
        "| what | value |",
        "| --- | --- |",
        f"| requests sent | {summary['requests']} |",
        f"| by client-side result | {', '.join(f'{k}: {v}' for k, v in sorted(summary['by_result'].items()))} |",
        f"| accepted (200, or abandoned by the client) | {summary['accepted']} |",
        f"| completion tokens received | {summary['completion_tokens']} |",
        f"| 5xx on healthy requests | {summary['server_errors_5xx']} |",
        f"| healthy / faulty requests | {summary['healthy_requests']} / {summary['faulty_requests']} |",
        f"| faulty requests by fault | {counts(summary['faulty_by_fault'])} |",
        f"| faulty requests by result | {counts(summary['faulty_by_result'])} |",
        f"| server RSS after start-up | {mib(report.rss_startup_kib)} |",
        f"| server RSS idle after warm-up (before load) | {mib(report.rss_idle_before_kib)} |",
        f"| server RSS peak during load | {mib(report.rss_peak_kib)} |",
        f"| server RSS idle after load | {mib(report.rss_idle_after_kib)} ({summary['rss_growth']:+.1%}) |",
        f"| SIGTERM to exit | {report.shutdown_seconds} s, exit code {report.exit_code} |",
    ]
    if report.metrics_available:
        lines += [
            f"| server-side finished / cancelled / error | {summary['server_finished']:.0f} / "
            f"{summary['server_cancelled'] or 0:.0f} / {summary['server_errors'] or 0:.0f} "
            f"({summary['server_errors_faulty']:.0f} of them faulty requests) |",
            f"| running / waiting after the load | {summary['server_running_after']:.0f} / "
            f"{summary['server_waiting_after']:.0f} |",
        ]
    else:
        lines.append("| server-side outcome counters | not available (this server has no /metrics route) |")
    per_preset = Counter((o.preset, o.result) for o in report.outcomes)
    presets = report.presets + (["faulty"] if any(o.fault for o in report.outcomes) else [])
    lines += ["", "## Per preset", "", "| preset | " + " | ".join(RESULTS) + " |", "|---" * (len(RESULTS) + 1) + "|"]
    for preset in presets:
        lines.append(f"| {preset} | " + " | ".join(str(per_preset.get((preset, r), 0)) for r in RESULTS) + " |")
    problems = [o for o in report.outcomes if o.result in ("server_error", "failed", "client_error")]
    if problems:
        lines += ["", "## Unexpected responses (first 10)", ""]
        lines += [f"- {o.preset} {o.route} stream={o.stream}: {o.result} {o.status} {o.error}" for o in problems[:10]]
    return "\n".join(lines) + "\n"


def counts(by_key: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(by_key.items())) or "-"


RESULTS = ["completed", "disconnected", "rejected", "client_error", "server_error", "faulted", "failed"]
