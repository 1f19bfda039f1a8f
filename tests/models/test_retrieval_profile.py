"""Retrieval-head profiles: ranking, the weights hash, where loading finds them, the shipped profile."""

from __future__ import annotations

import json

import pytest
import torch

from kvmux.cli_args import default_presets_dir
from kvmux.models import retrieval_profile as rp
from kvmux.models.retrieval_profile import RetrievalProfile, find_profile, weights_sha256, write_profile
from kvmux.policies.presets import load_presets
from tests.tiny_models import make_tiny


def profile_data(weights: str, scores: list[list[float]]) -> dict:
    return {"model": "tiny", "weights_sha256": weights, "scores": scores}


def test_ranking_mask_and_best_layer():
    profile = RetrievalProfile.from_dict(profile_data("x", [[0.1, 0.9, 0.0], [0.5, 0.5, 0.5], [0.9, 0.0, 0.0]]))
    assert profile.top_heads(3) == [(0, 1), (2, 0), (1, 0)]  # ties: lower layer, then head
    assert profile.head_mask(2).tolist() == [[False, True, False], [False, False, False], [True, False, False]]
    assert profile.best_layer() == 1  # the best mean, not the best single head
    assert profile.top_layers(2) == [1, 0]  # means 0.5, 0.33, 0.3
    with pytest.raises(ValueError, match="layers"):
        RetrievalProfile.from_dict(profile_data("x", [[0.1, 0.2], [0.3]]))


def test_gate_gains_rank_the_heads_left_after_an_exclusion_and_survive_a_round_trip():
    data = {**profile_data("x", [[0.1, 0.2], [0.3, 0.4]]), "gates": {"hip": {"gains": [[0.5, -0.1], [0.5, 0.9]]}}}
    profile = RetrievalProfile.from_dict(data)
    assert profile.gate_mask("hip", 2).tolist() == [[True, False], [False, True]]  # ties: the lower layer
    exclude = torch.tensor([[False, False], [False, True]])
    assert profile.gate_mask("hip", 2, exclude).tolist() == [[True, False], [True, False]]
    assert RetrievalProfile.from_dict(profile.as_dict()).gates == profile.gates
    with pytest.raises(KeyError):
        profile.gate_mask("flexprefill", 1)
    with pytest.raises(ValueError, match="shape"):
        RetrievalProfile.from_dict({**data, "gates": {"hip": {"gains": [[0.5, 0.1, 0.2], [0.5, 0.9, 0.0]]}}})


def test_weights_hash_follows_the_weights_not_the_dtype():
    model, _, _ = make_tiny("llama", seed=0)
    same, _, _ = make_tiny("llama", seed=0)
    other, _, _ = make_tiny("llama", seed=1)
    digest = weights_sha256(model)
    assert digest == weights_sha256(same) and digest != weights_sha256(other)
    assert weights_sha256(same.to(torch.bfloat16)) == digest  # loaded in bf16: the same profile applies


def test_the_cache_directory_is_searched_before_the_shipped_profiles(tmp_path, monkeypatch):
    cache, shipped = tmp_path / "cache", tmp_path / "shipped"
    monkeypatch.setenv("KVMUX_CACHE_DIR", str(cache))
    monkeypatch.setattr(rp, "SHIPPED_PROFILES", shipped)
    assert find_profile("abc", 1, 2) is None
    write_profile(shipped / "m.json", profile_data("abc", [[0.1, 0.2]]))
    assert find_profile("abc", 1, 2).scores == ((0.1, 0.2),)
    assert find_profile("other", 1, 2) is None and find_profile("abc", 2, 2) is None  # wrong weights / shape
    write_profile(cache / "retrieval_heads" / "m.json", profile_data("abc", [[0.3, 0.4]]))
    found = find_profile("abc", 1, 2)
    assert found.scores == ((0.3, 0.4),) and found.source.startswith(str(cache))
    (cache / "retrieval_heads" / "broken.json").write_text("{not json")  # skipped, not fatal
    assert find_profile("abc", 1, 2) is not None
    with pytest.raises(ValueError):
        write_profile(cache / "bad.json", {"model": "m", "weights_sha256": "abc", "scores": []})


@pytest.mark.model
def test_the_embedded_model_has_a_shipped_profile(smollm, tmp_path, monkeypatch):
    assert smollm.info.retrieval_heads is not None  # found when the model was loaded
    monkeypatch.setenv("KVMUX_CACHE_DIR", str(tmp_path))  # only the shipped profiles
    info = smollm.info
    shipped = find_profile(weights_sha256(smollm.model), info.num_layers, info.num_heads)
    assert shipped is not None and shipped.source.endswith("configs/retrieval_heads/SmolLM2-135M-Instruct.json")
    data = json.loads((rp.SHIPPED_PROFILES / "SmolLM2-135M-Instruct.json").read_text())
    assert data["prompts"] >= 20 and len(set(data["lengths"])) >= 3 and len(set(data["depths"])) >= 3
    gated = {p.policy.name for p in load_presets(default_presets_dir()).values() if getattr(p.params, "gate_heads", 0)}
    assert gated == {"hip", "flexprefill"} and gated <= set(shipped.gates)  # every gated preset runs out of the box
