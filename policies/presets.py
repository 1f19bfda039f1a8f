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
`kvmux.policies.composed`, which the functions below hand those to (single-policy presets:
`preset_single.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmux.errors import PresetError as PresetError  # raised by preset loading and resolution
from kvmux.policies.composed.spec import composed_preset_from_file, resolve_composed
from kvmux.policies.preset_single import PART_KEYS as PART_KEYS
from kvmux.policies.preset_single import REQUEST_KEYS as REQUEST_KEYS
from kvmux.policies.preset_single import Preset as Preset
from kvmux.policies.preset_single import read_preset_file, resolve_single, single_preset_from_data


def load_preset_file(path: Path, known: dict[str, Preset] | None = None) -> Preset:
    """One preset file; a composed preset's parts are looked up in `known`."""
    return _preset_from_data(path, read_preset_file(path), known or {})


def _preset_from_data(path: Path, data: dict[str, Any], known: dict[str, Preset]) -> Preset:
    if any(key in data for key in PART_KEYS):
        return composed_preset_from_file(path, data, known)
    return single_preset_from_data(path, data)


def load_presets(folder: Path, exposed: list[str] | None = None) -> dict[str, Preset]:
    """All presets in `folder` (optionally only the `exposed` names)."""
    presets: dict[str, Preset] = {}
    files = [(path, read_preset_file(path)) for path in sorted(folder.glob("*.yaml"))]
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
        return resolve_composed(spec, presets, default)
    return resolve_single(spec, presets, default)
