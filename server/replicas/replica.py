"""One kvmux replica on Ray Serve: its own model, engine, scheduler and FastAPI app, as `kvmux serve` builds them.

The app is kvmux's own (`create_app(config)`), run in-process: the replica enters the app's
lifespan when Serve starts it (the scheduler starts) and leaves it when Serve stops it (the
scheduler drains within `shutdown_grace_s`). Serve allows one `@serve.ingress` deployment per
application, and that is the entry (`ingress.py`), which hands requests to `forward`; `forward`
runs them through the app and adds `X-Kvmux-Replica` (this replica's id) to every response; the
same id labels the replica's metrics. Serve's health check asks `check_health`, so a replica
whose engine worker stopped is replaced.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator

from ray import serve

from kvmux.server.config import ServerConfig
from kvmux.server.replicas.forwarding import REPLICA_HEADER, ForwardedRequest, ResponsePart, run_asgi
from kvmux.server.serve import create_app

log = logging.getLogger("kvmux.server")


class Replica:
    """A kvmux server inside a Serve replica (deployed as KvmuxReplica)."""

    async def __init__(self, config: ServerConfig):
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        if config.replicas.num_cpus > 0:  # the torch threads this replica's CPU share pays for
            import torch

            torch.set_num_threads(max(1, math.floor(config.replicas.num_cpus)))
        self.app = create_app(config)
        # the hub token is needed only to fetch the model: keep it out of the serving process from now on
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            os.environ.pop(name, None)
        self.state = self.app.state.kvmux
        if self.state.metrics is not None:
            self.state.metrics.replica = self.replica_id
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()  # starts the scheduler
        log.info("replica %s serves %s", self.replica_id, self.state.engine.info.served_name)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponsePart]:
        """Answer one request forwarded by the entry (called with `stream=True`)."""
        async for part in run_asgi(self.app, request, [(REPLICA_HEADER.encode(), self.replica_id.encode())]):
            yield part

    def check_health(self) -> None:
        """Serve's periodic health check: fails once the engine cannot serve (Serve then replaces the replica)."""
        if not self.state.ready or not self.state.scheduler.alive:
            raise RuntimeError(f"kvmux replica {self.replica_id}: the engine cannot serve requests")

    async def __del__(self) -> None:
        """Serve stops the replica: running requests get `shutdown_grace_s` to finish, then the scheduler stops."""
        lifespan, self.lifespan = getattr(self, "lifespan", None), None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)


# decorated apart from the class, so that Ray pickles the class by reference (its module holds it)
KvmuxReplica = serve.deployment(name="KvmuxReplica")(Replica)
