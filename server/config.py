"""Server configuration: `configs/server.yaml`, validated at start-up, overridable by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvmux.models.loader import ModelSpec

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class AutoscalingSpec(BaseModel):
    """Serve's autoscaling of the model replicas: between min and max, aiming at a number of ongoing requests."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="ongoing requests per replica Serve aims at")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must not exceed autoscaling.max_replicas")
        return self


class ReplicasConfig(BaseModel):
    """Scale-out on Ray Serve (`kvmux serve --replicas N`, docs/scale_out.md); unused by a single process."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="model replicas (when autoscaling is not set)")
    autoscaling: AutoscalingSpec | None = Field(None, description="min/max replicas and target ongoing requests")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica (1 on a GPU box)")
    ray_address: str | None = Field(None, description="join this Ray cluster (default: start a local one)")
    affinity: Literal["prompt", "session", "off"] = Field(
        "prompt", description="prompt: X-Session-Id or else the prompt's first block; session: the header only; off"
    )
    affinity_prefix_chars: int = Field(512, ge=1, description="characters of the prompt's first block that are hashed")
    ingress_replicas: int = Field(1, ge=1, description="replicas of the light HTTP entry that routes to the models")

    @field_validator("affinity", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        """YAML 1.1 reads an unquoted `affinity: off` as false: take it as "off"."""
        return "off" if value is False else value

    @property
    def distributed(self) -> bool:
        """Whether `kvmux serve` runs on Ray Serve (several replicas, autoscaling, or a cluster to join)."""
        return self.num_replicas > 1 or self.autoscaling is not None or self.ray_address is not None


class ServerConfig(BaseModel):
    """Everything `kvmux serve` needs; field names carry their units."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = Field(default_factory=ModelSpec)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    presets_dir: Path = Field(REPO_CONFIGS / "policies", description="folder of policy preset YAML files")
    exposed_presets: list[str] | None = Field(None, description="presets offered to clients (default: all)")
    default_preset: str = Field("full", description="preset used when a request names none")
    max_active_sessions: int = Field(4, ge=1, description="requests running at once (interleaved)")
    max_queued_requests: int = Field(64, ge=0, description="waiting requests before 429")
    max_prompt_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="longest accepted prompt; auto: tokens whose full KV fills the memory budget (limits.py)"
    )
    max_query_tokens: int | None = Field(1024, ge=1, description="longest accepted kv_policy.query, in tokens")
    max_new_tokens: int | None = Field(4096, ge=1, description="largest accepted max_tokens")
    request_timeout_s: float | None = Field(600.0, gt=0, description="per-request deadline")
    kv_memory_budget_bytes: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="KV + step bytes all sessions may hold; auto: a share of the memory free after loading the model",
    )
    prefix_cache_bytes: Annotated[int, Field(ge=0)] | Literal["auto"] | None = Field(
        "auto",
        description="session states kept for prompts that extend a cached prefix; auto: a quarter of the KV "
        "memory budget; 0 or null: off",
    )
    batch_decode: bool = Field(True, description="decode concurrent requests in one forward where policies allow")
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys for /v1/* (empty: no auth)")
    auth_health_and_metrics: bool = Field(False, description="also require a key on /health and /metrics")
    auth_docs: bool = Field(True, description="with api_keys: also require a key on /docs, /redoc, /openapi.json")
    allow_unauthenticated: bool = Field(
        False, description="serve on a non-loopback host without api_keys (refused unless set)"
    )
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins (empty: CORS off)")
    max_request_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    request_body_timeout_s: float = Field(60.0, gt=0, description="a request body must arrive within this (else 408)")
    max_connections: int | None = Field(
        256, ge=1, description="open connections (and their request bodies) before uvicorn answers 503"
    )
    shutdown_grace_s: float = Field(
        8.0, ge=0, description="the whole SIGTERM shutdown (draining, stopping work, exit) fits in this"
    )
    policy_modules: list[str] = Field(
        default_factory=list, description="extra Python modules imported at start-up that register policies"
    )
    replicas: ReplicasConfig = Field(default_factory=ReplicasConfig, description="scale-out on Ray Serve")


def load_server_config(path: Path | None) -> ServerConfig:
    """Read a server YAML file (None: the repository default, or built-in defaults)."""
    path = path or REPO_CONFIGS / "server.yaml"
    if not path.is_file():
        return ServerConfig()
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return ServerConfig(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise SystemExit(f"{path}: field '{field}': {first['msg']}") from None
