"""Server configuration: `configs/server.yaml`, validated at start-up, overridable by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvmux.models.loader import ModelSpec

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
