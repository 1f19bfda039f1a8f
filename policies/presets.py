"""Named presets from `configs/policies/*.yaml` and per-request overrides.

A preset file holds one preset:

    name: streaming_llm          # preset name (defaults to the file name)
    policy: streaming_llm        # registered policy
    description: sinks + recent window
    params: {sink_tokens: 4, window: 1020}

Presets are validated at start-up (errors name the file and the field). A request picks a preset
by name, or sends `{"preset": name, <param>: value, ...}`; overrides are validated against the
policy's `Params` and reported with the parameter's name and what is allowed.

A file or request with `prefill` and `decode` instead composes two presets, one per phase (files:
`prefill: <preset>`, `decode: <preset>`; requests: `{"prefill": ..., "decode": ...}`): see
`kvmux.policies.composed`, which the functions below hand those to.
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


def _describe_errors(exc: ValidationError, prefix: str) -> tuple[str, str | None]:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    where = f"{prefix}.{field}" if field else prefix
    return f"{where}: {first['msg']}", field


# the fields of a composed preset (file or request) that name its two parts
PART_KEYS = ("prefill", "decode")


def _read_preset_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: expected a mapping with 'policy' and 'params'")
    return data


def load_preset_file(path: Path, known: dict[str, Preset] | None = None) -> Preset:
    """One preset file; a composed preset's parts are looked up in `known`."""
    return _preset_from_data(path, _read_preset_file(path), known or {})


def _preset_from_data(path: Path, data: dict[str, Any], known: dict[str, Preset]) -> Preset:
    if any(key in data for key in PART_KEYS):
        from kvmux.policies.composed.spec import composed_preset_from_file  # (it imports this module)

        return composed_preset_from_file(path, data, known)
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
        message, _ = _describe_errors(exc, "params")
        raise PresetError(f"{path}: {message}") from None
    name = str(data.get("name") or path.stem)
    return Preset(name, policy, params, str(data.get("description", "")), str(path))


def load_presets(folder: Path, exposed: list[str] | None = None) -> dict[str, Preset]:
    """All presets in `folder` (optionally only the `exposed` names)."""
    presets: dict[str, Preset] = {}
    files = [(path, _read_preset_file(path)) for path in sorted(folder.glob("*.yaml"))]
    # single-policy presets first: a composed preset names two of them
    for path, data in sorted(files, key=lambda item: any(key in item[1] for key in PART_KEYS)):
        preset = _preset_from_data(path, data, presets)
        if preset.name in presets:
            raise PresetError(f"{path}: preset name '{preset.name}' already defined in {presets[preset.name].source}")
        presets[preset.name] = preset
    if exposed is not None:
        missing = [n for n in exposed if n not in presets]
        if missing:
            raise PresetError(f"exposed presets {missing} not found in {folder}")
        presets = {n: presets[n] for n in exposed}
    return presets


# keys of a request's kv_policy object that are not policy parameters
REQUEST_KEYS = {"preset", "query"}


def resolve_request_policy(
    spec: str | dict[str, Any] | None, presets: dict[str, Preset], default: str
) -> tuple[Preset, str | None]:
    """Turn a request's `kv_policy` into (preset with overrides applied, query text)."""
    if spec is None:
        spec = default
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, dict):
        raise PresetError("kv_policy must be a preset name or an object with 'preset'", "kv_policy")
    name = spec.get("preset", default)
    if any(key in spec for key in PART_KEYS) or (isinstance(name, str) and name in presets and presets[name].parts):
        from kvmux.policies.composed.spec import resolve_composed  # (it imports this module)

        return resolve_composed(spec, presets, default)
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
        message, field = _describe_errors(exc, "kv_policy")
        raise PresetError(message, f"kv_policy.{field}" if field else "kv_policy") from None
    return Preset(preset.name, preset.policy, params, preset.description, preset.source), query
