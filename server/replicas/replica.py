"""One kvmux replica on Ray Serve: its own model, engine, scheduler and FastAPI app, as `kvmux serve` builds them.

Serve hosts the app (`@serve.ingress`, built in the replica by `__serve_build_asgi_app__`, its
lifespan run by Serve: the scheduler starts with the replica and drains when Serve stops it, within
`shutdown_grace_s`). The ingress hands requests to `forward`, which runs them through the app and
adds `X-Kvmux-Replica` (this replica's id) to every response; the same id labels its metrics.
Serve's health check asks `check_health`, so a replica whose engine worker stopped is replaced.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI
from ray import serve

from kvmux.server.config import ServerConfig
from kvmux.server.replicas.forwarding import REPLICA_HEADER, ForwardedRequest, ResponsePart, run_asgi
from kvmux.server.serve import create_app
from kvmux.server.state import ServerState

log = logging.getLogger("kvmux.server")


@serve.deployment(name="KvmuxReplica")
@serve.ingress()
class KvmuxReplica:
    """A kvmux server inside a Serve replica."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.state: ServerState | None = None
        cpus = config.replicas.num_cpus
        if cpus > 0:  # the torch threads this replica's CPU share pays for
            import torch

            torch.set_num_threads(max(1, math.floor(cpus)))

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.config)
        # the hub token is needed only to fetch the model: keep it out of the serving process from now on
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            os.environ.pop(name, None)
        self.state = app.state.kvmux
        if self.state.metrics is not None:
            self.state.metrics.replica = self.replica_id
        log.info("replica %s serves %s", self.replica_id, self.state.engine.info.served_name)
        return app

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponsePart]:
        """Answer one request forwarded by the ingress (called with `stream=True`)."""
        async for part in run_asgi(self.app, request, [(REPLICA_HEADER.encode(), self.replica_id.encode())]):
            yield part

    def check_health(self) -> None:
        """Serve's periodic health check: fails once the engine cannot serve (Serve then replaces the replica)."""
        state = self.state
        if state is None or not state.ready or not state.scheduler.alive:
            raise RuntimeError(f"kvmux replica {self.replica_id}: the engine cannot serve requests")
