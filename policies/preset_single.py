"""Single-policy presets: the `Preset` type, reading a preset file, and applying a request's overrides.

`kvmux.policies.presets` is the entry point (it also handles composed presets, `kvmux.policies.composed`,
which build on this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvmux.errors import PresetError as PresetError  # raised by preset loading and resolution
from kvmux.policies.base import Policy, PolicyParams
from kvmux.policies.registry import get_policy, policy_names


@dataclass(frozen=True)
class Preset:
    name: str
    policy: Policy
    params: PolicyParams
    description: str = ""
    source: str = ""

    @property
    def parts(self) -> dict[str, str] | None:
        """A composed preset's prefill and decode preset names (None for a single-policy preset)."""
        return getattr(self.policy, "part_presets", None)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "policy": self.policy.name,
            "paper": self.policy.paper,
            "description": self.description,
            "params": self.params.model_dump(mode="json"),
            "schema": type(self.params).model_json_schema(),
            "extends_context": self.policy.extends_context,
        }
        if self.parts is not None:
            out["composed"] = dict(self.parts)
        return out


def describe_errors(exc: ValidationError, prefix: str) -> tuple[str, str | None]:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    where = f"{prefix}.{field}" if field else prefix
    return f"{where}: {first['msg']}", field


# the fields of a composed preset (file or request) that name its two parts
PART_KEYS = ("prefill", "decode")


def read_preset_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: expected a mapping with 'policy' and 'params'")
    return data


def single_preset_from_data(path: Path, data: dict[str, Any]) -> Preset:
    """A single-policy preset from a preset file's mapping."""
    unknown = set(data) - {"name", "policy", "description", "params"}
    if unknown:
        raise PresetError(f"{path}: unknown field(s) {sorted(unknown)}; allowed: name, policy, description, params")
    policy_name = data.get("policy")
    if policy_name not in policy_names():
        raise PresetError(f"{path}: field 'policy': '{policy_name}' is not one of {policy_names()}")
    policy = get_policy(policy_name)
    try:
        params = policy.Params(**(data.get("params") or {}))
    except ValidationError as exc:
        message, _ = describe_errors(exc, "params")
        raise PresetError(f"{path}: {message}") from None
    name = str(data.get("name") or path.stem)
    return Preset(name, policy, params, str(data.get("description", "")), str(path))


# keys of a request's kv_policy object that are not policy parameters
REQUEST_KEYS = {"preset", "query"}


def resolve_single(spec: dict[str, Any], presets: dict[str, Preset], default: str) -> tuple[Preset, str | None]:
    """A `kv_policy` object naming one single-policy preset -> (preset with overrides applied, query text)."""
    name = spec.get("preset", default)
    if not isinstance(name, str):
        raise PresetError(
            f"kv_policy.preset must be a preset name (a string); available presets: {sorted(presets)}",
            "kv_policy.preset",
        )
    if name not in presets:
        raise PresetError(
            f"Unknown kv_policy preset '{name}'; available presets: {sorted(presets)}", "kv_policy.preset"
        )
    preset = presets[name]
    query = spec.get("query")
    if query is not None and not isinstance(query, str):
        raise PresetError("kv_policy.query must be a string", "kv_policy.query")
    overrides = {k: v for k, v in spec.items() if k not in REQUEST_KEYS}
    if not overrides:
        return preset, query
    allowed = sorted(type(preset.params).model_fields)
    for key in overrides:
        if key not in allowed:
            raise PresetError(
                f"Unknown parameter '{key}' for policy '{preset.policy.name}'; allowed: {allowed}",
                f"kv_policy.{key}",
            )
    try:
        params = preset.policy.Params(**{**preset.params.model_dump(), **overrides})
    except ValidationError as exc:
        message, field = describe_errors(exc, "kv_policy")
        raise PresetError(message, f"kv_policy.{field}" if field else "kv_policy") from None
    return Preset(preset.name, preset.policy, params, preset.description, preset.source), query
