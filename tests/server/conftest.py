"""A real kvmux server on 127.0.0.1 (uvicorn in a thread) around the embedded model, and openai clients;
the servers of the hostile-client tests (limits in hostile.py)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from kvmux.policies.presets import load_presets
from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.serve import create_app
from tests.server.hostile import BODY_TIMEOUT_S, KEY, LIMIT, ORIGIN

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "policies"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, port: int):
        self.app = app
        self.engine = app.state.kvmux.engine
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(smollm, **config):
    engine = Engine(smollm, load_presets(PRESETS), prefill_chunk_tokens=512, max_new_tokens=config.pop("max_new", 512))
    app = create_app(ServerConfig(**config), engine=engine)
    return LiveServer(app, free_port())


@pytest.fixture(scope="session")
def live_server(smollm):
    with start_server(smollm) as server:
        yield server


@pytest.fixture()
def client(live_server):
    import openai

    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="package")
def hostile_server(smollm):
    """A server with a small body limit, a short body deadline and at most 4 new tokens."""
    config = {"max_request_body_bytes": LIMIT, "request_body_timeout_s": BODY_TIMEOUT_S, "request_timeout_s": 60.0}
    with start_server(smollm, max_new=4, **config) as live:
        live.state = live.server.config.app.state.kvmux
        yield live


@pytest.fixture(scope="package")
def keyed_server(smollm):
    """A server with an API key and CORS on."""
    with start_server(smollm, max_new=4, api_keys=[KEY], cors_origins=[ORIGIN]) as live:
        live.state = live.server.config.app.state.kvmux
        yield live
