"""Gate gains (`kvmux calibrate --gates`): the gradient, its finite-difference check, the heads it cannot
help, resuming, and the profile entry HiP's `gate_heads` reads."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from kvmux.cli import build_parser
from kvmux.evals.calibrate import cli as calibrate_cli
from kvmux.evals.calibrate import gates as gates_module
from kvmux.evals.calibrate import probe as probe_module
from kvmux.evals.calibrate.gates import gate_gains, gated_log_probs, measure_gates, top_gains
from kvmux.evals.calibrate.probe import CopyResult
from kvmux.evals.calibrate.prompts import needle_prompts
from kvmux.models.loader import LoadedModel
from kvmux.models.retrieval_profile import RetrievalProfile
from kvmux.policies.base import SessionRequest, run_prefill
from kvmux.policies.preset_single import Preset
from kvmux.policies.registry import get_policy
from tests.tiny_models import byte_tokenizer, make_tiny

HIP = dict(mask_k=16, block_size_q=16, block_stride_q=2, sink_tokens=2, window=8, dense_layers=0)


def hip_preset(**params) -> Preset:
    policy = get_policy("hip")
    return Preset("hip_test", policy, policy.Params(**{**HIP, **params}))


def prompt_ids(length: int = 300) -> list[int]:
    return torch.randint(0, 250, (length,), generator=torch.Generator().manual_seed(5)).tolist()


def test_the_gain_is_the_first_order_drop_of_the_answers_loss(tiny_llama):
    model, info, runner = tiny_llama
    preset, ids = hip_preset(), prompt_ids()
    found = gate_gains(runner, info, preset, ids, answer=[7])
    assert all(p.grad is None for p in model.parameters())  # only the gates' gradient is computed
    assert found.gains.shape == (info.num_layers, info.num_heads) and found.gains.abs().sum() > 0
    layer, head, _ = top_gains(found.gains.abs(), 1)[0]
    eps = 1e-3
    gates = torch.zeros(info.num_layers, info.num_heads)
    gates[layer, head] = eps
    moved = -float(gated_log_probs(runner, info, preset, ids, gates)[7].detach())
    slope = (moved - found.nll) / eps
    assert slope == pytest.approx(-float(found.gains[layer, head]), rel=0.05, abs=1e-4)


def test_gates_at_one_give_dense_attention_at_the_gated_rows(tiny_llama):
    _, info, runner = tiny_llama
    ids = prompt_ids(96)  # the gated rows are the whole prompt
    full = get_policy("full")
    session = full.new_session(full.Params(), info, SessionRequest())
    with torch.inference_mode():
        dense = run_prefill(session, runner, torch.tensor([ids])).float().log_softmax(-1).flatten()
    session.close()
    sparse = gated_log_probs(runner, info, hip_preset(), ids, torch.zeros(info.num_layers, info.num_heads))
    mixed = gated_log_probs(runner, info, hip_preset(), ids, torch.ones(info.num_layers, info.num_heads))
    assert not torch.allclose(sparse, dense, atol=1e-4)  # the prompt is long enough to be sparse
    assert torch.allclose(mixed.detach(), dense, atol=1e-4)


def test_dense_layers_and_retrieval_heads_gain_nothing(tiny_llama):
    _, info, runner = tiny_llama
    scores = [[0.0] * info.num_heads for _ in range(info.num_layers)]
    scores[1][2] = 1.0
    info_rh = dataclasses.replace(info, retrieval_heads=RetrievalProfile("tiny", "0" * 64, tuple(map(tuple, scores))))
    preset = hip_preset(dense_layers=1, retrieval_heads=1)
    gains = gate_gains(runner, info_rh, preset, prompt_ids(), answer=[3]).gains
    assert gains[0].abs().sum() == 0 and gains[1, 2] == 0  # already dense: nothing to gain
    assert gains[1].abs().sum() > 0


def test_only_hip_and_flexprefill_presets_are_gated(tiny_llama):
    _, info, runner = tiny_llama
    window = get_policy("streaming_llm")
    with pytest.raises(ValueError, match="hip, flexprefill"):
        gate_gains(runner, info, Preset("sw", window, window.Params()), prompt_ids(), answer=[1])


def test_gate_measurement_skips_wrong_dense_answers_and_resumes(tmp_path, monkeypatch):
    model, info, runner = make_tiny("llama")
    loaded = LoadedModel(model, byte_tokenizer(), info)
    prompts = needle_prompts(loaded.tokenizer, [400], [10, 90], 2, seed=42, chat=True)[:3]
    right = {prompts[0].key, prompts[2].key}  # the random model "answers" these two

    def fake_probe(runner, info, ids, positions, steps=0):
        key = next(p.key for p in prompts if p.ids == ids)
        value = next(p.value for p in prompts if p.key == key) if key in right else "0000000"
        return CopyResult(torch.zeros(1, dtype=torch.bool), loaded.tokenizer.encode(" " + value))

    monkeypatch.setattr(probe_module, "probe_prompt", fake_probe)
    partial = tmp_path / "g.partial.jsonl"
    entry = measure_gates(loaded, runner, info, hip_preset(), prompts, partial)
    assert entry["prompts"] == 2 and entry["skipped_dense_wrong"] == 1 and entry["preset"] == "hip_test"
    assert len(entry["gains"]) == info.num_layers and len(entry["gains"][0]) == info.num_heads
    measured, original = [], gates_module.gate_gains

    def counting(*args):
        measured.append(args[2].params.mask_k)
        return original(*args)

    monkeypatch.setattr(gates_module, "gate_gains", counting)
    assert measure_gates(loaded, runner, info, hip_preset(), prompts, partial) == entry and not measured
    changed = measure_gates(loaded, runner, info, hip_preset(mask_k=32), prompts, partial)
    assert measured == [32, 32] and changed["params"]["mask_k"] == 32  # other parameters: measured again
    profile = RetrievalProfile.from_dict({"model": "t", "weights_sha256": "x", "scores": entry["gains"],
                                          "gates": {"hip": entry}})  # fmt: skip
    assert profile.gates["hip"] == tuple(tuple(row) for row in entry["gains"])


def test_gate_options_refuse_presets_they_cannot_measure(tmp_path):
    model, info, runner = make_tiny("llama")
    loaded = LoadedModel(model, byte_tokenizer(), info)
    args = argparse.Namespace(gates="streaming_llm", presets_dir=None, gate_lengths=[400], depths=[50], samples=1,
                              seed=42, gate_tasks=["niah_single_book"])  # fmt: skip
    with pytest.raises(SystemExit, match="streaming_llm"):
        calibrate_cli.gates_entry(args, loaded, runner, None, tmp_path / "p.json", True)
    args.gates = "nope"
    with pytest.raises(SystemExit, match="unknown preset"):
        calibrate_cli.gates_entry(args, loaded, runner, None, tmp_path / "p.json", True)
    args.gates, args.gate_tasks = "hip_rh", []
    with pytest.raises(SystemExit, match="--gate-tasks needs one of .*passkey"):
        calibrate_cli.gates_entry(args, loaded, runner, None, tmp_path / "p.json", True)


def test_gate_tasks_are_checked_before_the_model_loads(capsys):
    parsed = build_parser().parse_args(["calibrate", "--gate-tasks", "passkey,niah_single_book"])
    assert parsed.gate_tasks == ["passkey", "niah_single_book"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--gate-tasks", "passkey,vt"])
    assert "unknown gate task 'vt'" in capsys.readouterr().err


def test_gates_only_adds_to_the_profile_found_for_the_weights(tmp_path):
    _, info, _ = make_tiny("llama")
    with pytest.raises(SystemExit, match="needs a retrieval-head profile"):
        calibrate_cli.found_profile_data(info, "hip_rh")
    with pytest.raises(SystemExit, match="--gates PRESET"):
        calibrate_cli.found_profile_data(info, None)
    scores = [[0.5] * info.num_heads for _ in range(info.num_layers)]
    data = {"model": "tiny", "weights_sha256": "w", "scores": scores, "gates": {"hip": {"gains": scores}}}
    (tmp_path / "p.json").write_text(json.dumps(data))
    found = dataclasses.replace(info, retrieval_heads=RetrievalProfile.from_dict(data, str(tmp_path / "p.json")))
    kept = calibrate_cli.found_profile_data(found, "hip_rh")
    assert kept["scores"] == scores and kept["gates"] == data["gates"]


def test_recalibrating_keeps_gate_gains_only_for_the_same_copy_scores(tmp_path, capsys):
    scores = [[0.5, 0.1], [0.0, 0.9]]
    gates = {"hip": {"gains": [[0.1, 0.2], [0.3, 0.4]]}}
    target = tmp_path / "p.json"
    target.write_text(json.dumps({"model": "tiny", "weights_sha256": "w", "scores": scores, "gates": gates}))
    assert calibrate_cli.kept_gates(target, "w", scores) == gates
    assert calibrate_cli.kept_gates(target, "other weights", scores) == {}
    assert calibrate_cli.kept_gates(target, "w", [[0.5, 0.1], [0.9, 0.0]]) == {}
    assert "gate gains of hip dropped" in capsys.readouterr().out
    assert calibrate_cli.kept_gates(tmp_path / "missing.json", "w", scores) == {}
