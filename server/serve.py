"""Compose the server from a config: load the model, build engine, scheduler and app."""

from __future__ import annotations

from fastapi import FastAPI

from kvmux.server.app import build_app
from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.metrics import Metrics
from kvmux.server.scheduler import Scheduler
from kvmux.server.state import ServerState


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    if engine is None:
        from kvmux.cli import build_engine

        engine = build_engine(config)
    metrics = Metrics(engine.info.served_name)
    scheduler = Scheduler(
        engine,
        max_active_sessions=config.max_active_sessions,
        max_queued_requests=config.max_queued_requests,
        on_event=metrics.on_event,
        kv_memory_budget_bytes=config.kv_memory_budget_bytes,
        batch_decode=config.batch_decode,
    )
    return build_app(ServerState(config=config, engine=engine, scheduler=scheduler, metrics=metrics))
