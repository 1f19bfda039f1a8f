"""The Serve application of replicated kvmux, built from kvmux's server config.

Two deployments: `KvmuxReplica` (N replicas, each its own model and engine; resources and
autoscaling from the config's `replicas` block) behind `KvmuxIngress` (no model, no CPU share).
Serve's backpressure follows kvmux's own admission limits: Serve sends a replica at most
`max_active_sessions + max_queued_requests` requests (what one kvmux server holds before it
answers 429), holds at most `max_queued_requests` more while every replica is full, and beyond
that the entry answers 429 with Retry-After, as a single kvmux server does.

`app_builder` is the import path for Serve's own tools and KubeRay's RayService:
`serve run kvmux.server.replicas.deploy:app_builder config=configs/server.yaml`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from kvmux.server.config import ServerConfig, load_server_config
from kvmux.server.replicas.ingress import IngressSettings, KvmuxIngress
from kvmux.server.replicas.replica import KvmuxReplica
from kvmux.server.replicas.router import KvmuxAffinityRouter

APP_NAME = "kvmux"
SPARE_INGRESS_SLOTS = 16  # requests the entry takes beyond the replicas' capacity: health checks, scrapes


def replica_capacity(config: ServerConfig) -> int:
    """Requests one replica holds at once: running plus waiting, as one kvmux server (Serve's max_ongoing_requests)."""
    return config.max_active_sessions + config.max_queued_requests


def replica_options(config: ServerConfig) -> dict[str, Any]:
    """Serve's options of the model deployment."""
    replicas = config.replicas
    options: dict[str, Any] = {
        "max_ongoing_requests": replica_capacity(config),
        "max_queued_requests": max(1, config.max_queued_requests),
        "ray_actor_options": {"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus},
        "request_router_config": RequestRouterConfig(request_router_class=KvmuxAffinityRouter),
        "graceful_shutdown_timeout_s": config.shutdown_grace_s,
    }
    if replicas.autoscaling is not None:
        options["autoscaling_config"] = replicas.autoscaling.model_dump()
    else:
        options["num_replicas"] = replicas.num_replicas
    return options


def ingress_options(config: ServerConfig) -> dict[str, Any]:
    """Serve's options of the entry: never the bottleneck of what the replicas can take."""
    replicas = config.replicas
    most = replicas.autoscaling.max_replicas if replicas.autoscaling is not None else replicas.num_replicas
    capacity = replica_capacity(config) * most + max(1, config.max_queued_requests) + SPARE_INGRESS_SLOTS
    return {
        "num_replicas": replicas.ingress_replicas,
        "max_ongoing_requests": capacity,
        "ray_actor_options": {"num_cpus": 0},
    }


def ingress_settings(config: ServerConfig) -> IngressSettings:
    return IngressSettings(
        affinity=config.replicas.affinity,
        prefix_chars=config.replicas.affinity_prefix_chars,
        max_body_bytes=config.max_request_body_bytes,
        body_timeout_s=config.request_body_timeout_s,
    )


def build_application(config: ServerConfig) -> Application:
    """The entry bound to the model replicas, ready for `serve.run`."""
    model = KvmuxReplica.options(**replica_options(config)).bind(config)
    return KvmuxIngress.options(**ingress_options(config)).bind(model, ingress_settings(config))


def app_builder(args: dict[str, str]) -> Application:
    """Serve's application builder: `args` may name `config` (a server YAML; default configs/server.yaml).

    As with `kvmux serve`, the environment's KVMUX_API_KEY is added to the config's keys.
    """
    config = load_server_config(Path(args["config"]) if args.get("config") else None)
    key = os.environ.get("KVMUX_API_KEY")
    if key:
        config = config.model_copy(update={"api_keys": [*config.api_keys, key]})
    return build_application(config)
