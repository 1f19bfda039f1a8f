"""Compose the server from a config (load the model, build engine, scheduler and app) and run it.

Shutdown budget: on SIGTERM the whole shutdown fits `shutdown_grace_s`. New requests get 503 at
once; running ones may finish until `grace - margin`, then they are stopped (at the next layer
boundary) with a 503; open connections then close, the worker is joined and the process exits.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from kvmux.models.loader import load_model
from kvmux.policies.presets import load_presets
from kvmux.policies.registry import import_policy_modules
from kvmux.server.app import build_app
from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.metrics import Metrics
from kvmux.server.prefix_metrics import register_prefix_cache
from kvmux.server.scheduler import Scheduler
from kvmux.server.state import ServerState

log = logging.getLogger("kvmux.server")


def build_engine(config: ServerConfig) -> Engine:
    """Load the configured model and presets (plugin policies first) into an engine."""
    import_policy_modules(config.policy_modules)
    presets = load_presets(Path(config.presets_dir), config.exposed_presets)
    return Engine(
        load_model(config.model),
        presets,
        default_preset=config.default_preset,
        prefill_chunk_tokens=config.model.prefill_chunk_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        max_new_tokens=config.max_new_tokens,
        kv_memory_budget_bytes=config.kv_memory_budget_bytes,
        max_query_tokens=config.max_query_tokens,
        prefix_cache_bytes=config.prefix_cache_bytes,
    )


def unauthenticated_exposure(config: ServerConfig) -> str | None:
    """Why serving with this config is refused: a non-loopback host, no API key, and no opt-in."""
    if config.api_keys or config.allow_unauthenticated:
        return None
    host = config.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"refusing to serve on '{config.host}' (reachable from other machines) without an API key. "
        "Set one with --api-key or the KVMUX_API_KEY environment variable (or api_keys in the config), "
        "or pass --allow-unauthenticated (allow_unauthenticated: true) to serve without authentication."
    )


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    if engine is None:
        engine = build_engine(config)
    metrics = Metrics(engine.info.served_name)
    if engine.prefix_cache is not None:
        register_prefix_cache(metrics.registry, engine.prefix_cache, engine.info.served_name)
    scheduler = Scheduler(
        engine,
        max_active_sessions=config.max_active_sessions,
        max_queued_requests=config.max_queued_requests,
        on_event=metrics.on_event,
        kv_memory_budget_bytes=config.kv_memory_budget_bytes,
        batch_decode=config.batch_decode,
    )
    return build_app(ServerState(config=config, engine=engine, scheduler=scheduler, metrics=metrics))


def shutdown_plan(grace_s: float) -> tuple[float, float]:
    """(seconds running work may continue, seconds uvicorn waits for connections) after SIGTERM.

    The margin covers stopping work at a layer boundary, flushing the last responses, joining the
    worker and exiting; everything together stays within `grace_s`.
    """
    margin = min(2.0, grace_s / 2)
    return grace_s - margin, grace_s - margin / 4


class DrainingServer(uvicorn.Server):
    """uvicorn's server that starts draining the scheduler the moment a shutdown begins."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace_s: float):
        super().__init__(config)
        self.scheduler = scheduler
        self.grace_s = grace_s

    async def shutdown(self, sockets=None) -> None:
        work, _ = shutdown_plan(self.grace_s)
        log.info("shutting down: running requests get %.1f s, the whole shutdown %.1f s", work, self.grace_s)
        self.scheduler.drain(work)
        await super().shutdown(sockets)


def draining_server(app: FastAPI, config: ServerConfig, log_level: str = "info") -> DrainingServer:
    """The uvicorn server for `app`: connection limit and shutdown budget from `config`."""
    _, connections = shutdown_plan(config.shutdown_grace_s)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        # uvicorn counts the new connection itself: N + 1 lets N connections be served at once
        limit_concurrency=None if config.max_connections is None else config.max_connections + 1,
        timeout_graceful_shutdown=connections,
    )
    return DrainingServer(uv_config, app.state.kvmux.scheduler, config.shutdown_grace_s)


def run_server(app: FastAPI, config: ServerConfig, log_level: str = "info") -> None:
    """Serve `app` until SIGINT/SIGTERM, then shut down within `config.shutdown_grace_s`."""
    draining_server(app, config, log_level).run()
