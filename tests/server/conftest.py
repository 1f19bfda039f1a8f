"""A real kvmux server on 127.0.0.1 (uvicorn in a thread) around the embedded model, and openai clients."""

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
