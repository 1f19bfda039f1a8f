"""The soak test's server process (see scripts/soak.py): start `kvmux serve` on a free port, wait
until it is healthy, read its RSS and its Prometheus metrics, wait until it is idle.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
FAULTY_PRESET = "faulty"


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
