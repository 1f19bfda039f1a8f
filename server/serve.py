"""Compose the server from a config: load the model, build engine, scheduler and app."""

from __future__ import annotations

from fastapi import FastAPI
from kvmux.server.app import build_app
from kvmux.server.config import ServerConfig
from kvmux.server.engine import Engine
from kvmux.server.scheduler import Scheduler
from kvmux.server.state import ServerState


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    if engine is None:
        from kvmux.cli import build_engine

        engine = build_engine(config)
    scheduler = Scheduler(
        engine,
        max_active_sessions=config.max_active_sessions,
        max_queued_requests=config.max_queued_requests,
        kv_memory_budget_bytes=config.kv_memory_budget_bytes,
    )
    return build_app(ServerState(config=config, engine=engine, scheduler=scheduler))
