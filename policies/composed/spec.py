"""Composed presets from preset files and from requests' `kv_policy` objects.

A preset file:

    name: flexprefill+lazy_eviction      # defaults to the file name
    description: FlexPrefill's prefill, then LazyEviction's decode
    prefill: flexprefill                 # a single-policy preset's name, or {preset: name, <param>: value}
    decode: {preset: lazy_eviction, budget: 512}

A request (`kv_policy`, both endpoints):
- `{"prefill": <preset name or object>, "decode": <preset name or object>, "query": "..."}`: any two
  presets (the preset is named `<prefill preset>+<decode preset>`);
- `{"preset": "<composed preset>", "decode": {"budget": 512}}`: a composed preset, with overrides of a
  part's parameters (a part object without "preset" starts from that preset's own part).
A part object is `{"preset": name, <param>: value, ...}`, validated as a single preset's overrides;
`query` is given once, at the top. Errors name the part (`kv_policy.decode.budget`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmux.policies.composed.policy import compose
from kvmux.policies.preset_single import PART_KEYS, Preset, PresetError, resolve_single

REQUEST_KEYS = {"preset", "query", *PART_KEYS}
FILE_KEYS = {"name", "description", *PART_KEYS}


def resolve_composed(spec: dict[str, Any], presets: dict[str, Preset], default: str) -> tuple[Preset, str | None]:
    """A request's composed `kv_policy` -> (composed preset, query text)."""
    unknown = sorted(set(spec) - REQUEST_KEYS, key=str)
    if unknown:
        raise PresetError(
            f"Unknown key '{unknown[0]}' in a composed kv_policy; allowed: {sorted(REQUEST_KEYS)}",
            f"kv_policy.{unknown[0]}",
        )
    query = spec.get("query")
    if query is not None and not isinstance(query, str):
        raise PresetError("kv_policy.query must be a string", "kv_policy.query")
    base = None
    if "preset" in spec or not any(part in spec for part in PART_KEYS):
        base = _composed_preset(spec.get("preset", default), presets)
    if base is not None and not any(part in spec for part in PART_KEYS):
        return base, query
    parts = [_part(part, spec.get(part), base, presets, "kv_policy") for part in PART_KEYS]
    if base is not None:
        return compose(base.name, *parts, description=base.description, source=base.source), query
    return compose(f"{parts[0].name}+{parts[1].name}", *parts), query


def composed_preset_from_file(path: Path, data: dict[str, Any], presets: dict[str, Preset]) -> Preset:
    """A composed preset file's preset; `presets` holds the single-policy presets it may name."""
    unknown = sorted(set(data) - FILE_KEYS, key=str)
    if unknown:
        raise PresetError(
            f"{path}: unknown field(s) {unknown} in a composed preset; allowed: name, description, prefill, decode"
        )
    try:
        parts = [_part(part, data.get(part), None, presets, "") for part in PART_KEYS]
        name = str(data.get("name") or path.stem)
        return compose(name, *parts, description=str(data.get("description", "")), source=str(path))
    except PresetError as exc:
        raise PresetError(f"{path}: {exc.message}") from None


def _composed_preset(name: Any, presets: dict[str, Preset]) -> Preset:
    if not isinstance(name, str) or name not in presets:
        raise PresetError(
            f"Unknown kv_policy preset {name!r}; available presets: {sorted(presets)}", "kv_policy.preset"
        )
    if presets[name].parts is None:
        raise PresetError(
            f"kv_policy.preset '{name}' is not a composed preset: to compose two presets, send kv_policy.prefill "
            "and kv_policy.decode without kv_policy.preset",
            "kv_policy.preset",
        )
    return presets[name]


def _part(part: str, given: Any, base: Preset | None, presets: dict[str, Preset], label: str) -> Preset:
    """One part: a preset name or object, over `base`'s own part when `base` (a composed preset) is given."""
    where = f"{label}.{part}" if label else part
    own = base.policy.part(part, base.params) if base is not None else None
    if given is None:
        if own is None:
            raise PresetError(f"{where} is missing: a composed policy names a prefill and a decode preset", where)
        return own
    if isinstance(given, str):
        given = {"preset": given}
    if not isinstance(given, dict):
        raise PresetError(f"{where} must be a preset name or an object {{'preset': name, <param>: value}}", where)
    if "query" in given:
        raise PresetError(f"{where}.query: give the query once, as kv_policy.query", f"{where}.query")
    if any(key in given for key in PART_KEYS):
        raise PresetError(f"{where} is one preset; a part cannot itself be composed", where)
    name = given.get("preset", own.name if own is not None else None)
    if name is None:
        raise PresetError(f"{where}.preset is missing: name the {part} part's preset", f"{where}.preset")
    source = {own.name: own} if own is not None and name == own.name else presets
    if isinstance(name, str) and name in source and source[name].parts is not None:
        raise PresetError(
            f"{where}: '{name}' is a composed preset; each part of a composed preset is a single-policy preset",
            f"{where}.preset",
        )
    try:
        preset, _ = resolve_single({**given, "preset": name}, source, name)
    except PresetError as exc:
        message = exc.message.replace("kv_policy", where)
        param = (exc.param or "kv_policy").replace("kv_policy", where, 1)
        raise PresetError(message if where in message else f"{where}: {message}", param) from None
    return preset
