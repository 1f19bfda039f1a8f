"""Preset files and per-request overrides: validation with errors that name the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmux.policies.presets import PresetError, load_preset_file, load_presets, resolve_request_policy
from kvmux.policies.registry import get_policy, policy_names

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "policies"


def test_repository_presets_load_and_cover_every_policy():
    presets = load_presets(CONFIGS)
    assert {p.policy.name for p in presets.values() if p.parts is None} == set(policy_names())


def test_every_policy_documents_itself():
    for name in policy_names():
        policy = get_policy(name)
        module = __import__(type(policy).__module__, fromlist=["_"])
        doc = module.__doc__ or ""
        if name != "full":
            assert policy.paper and policy.paper in doc and "arxiv" in doc.lower(), name
            assert "Deviation" in doc, name
        for field, info in policy.Params.model_fields.items():
            assert info.description, f"{name}.{field} has no description"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_bad_preset_files_name_file_and_field(tmp_path):
    with pytest.raises(PresetError, match=r"p\.yaml: field 'policy': 'nope'"):
        load_preset_file(_write(tmp_path, "policy: nope\n"))
    with pytest.raises(PresetError, match=r"p\.yaml: params\.window"):
        load_preset_file(_write(tmp_path, "policy: streaming_llm\nparams: {window: -1}\n"))
    with pytest.raises(PresetError, match=r"p\.yaml: params\.bogus"):
        load_preset_file(_write(tmp_path, "policy: streaming_llm\nparams: {bogus: 1}\n"))
    with pytest.raises(PresetError, match="unknown field"):
        load_preset_file(_write(tmp_path, "policy: full\nextra: 1\n"))
    with pytest.raises(PresetError, match="not valid YAML"):
        load_preset_file(_write(tmp_path, "policy: [\n"))


def test_request_overrides():
    presets = load_presets(CONFIGS)
    preset, query = resolve_request_policy({"preset": "streaming_llm", "window": 64, "query": "q?"}, presets, "full")
    assert preset.params.window == 64 and preset.params.sink_tokens == 4 and query == "q?"
    assert presets["streaming_llm"].params.window == 1020  # the shared preset is untouched
    assert resolve_request_policy(None, presets, "full")[0].name == "full"
    with pytest.raises(PresetError) as info:
        resolve_request_policy({"preset": "streaming_llm", "window": "wide"}, presets, "full")
    assert info.value.param == "kv_policy.window"
    with pytest.raises(PresetError, match="allowed"):
        resolve_request_policy({"preset": "streaming_llm", "size": 3}, presets, "full")
    with pytest.raises(PresetError, match="available presets"):
        resolve_request_policy("unknown", presets, "full")


@pytest.mark.parametrize(
    ("variant", "changed"), [("hip_rh_gate_exact", {"search": "exact"}), ("hip_rh_gate_exact10", {"exact_layers": 10})]
)
def test_hip_gate_variants_change_only_their_search(variant, changed):
    presets = load_presets(CONFIGS)
    base, other = presets["hip_rh_gate"].params.model_dump(), presets[variant].params.model_dump()
    assert {k: v for k, v in other.items() if base[k] != v} == changed
