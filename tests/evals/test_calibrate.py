"""`kvmux calibrate`: the copy-paste events, the needle prompts, resuming, and the score on the real model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvmux.cli import build_parser
from kvmux.evals.calibrate import cli as calibrate_cli
from kvmux.evals.calibrate import probe as probe_module
from kvmux.evals.calibrate.probe import copy_events, probe_prompt
from kvmux.evals.calibrate.prompts import needle_prompts
from kvmux.models.loader import LoadedModel
from kvmux.models.retrieval_profile import RetrievalProfile
from kvmux.models.runner import Runner
from tests.tiny_models import byte_tokenizer, make_tiny


def test_a_head_copies_when_its_top_position_holds_the_generated_needle_token():
    ids = torch.tensor([5, 7, 3, 7, 9, 1])
    value = torch.tensor([2, 3, 4])  # the needle's value: tokens 3, 7, 9
    tops = torch.tensor([[3, 1], [2, 4]])  # [layers, heads]: the most attended position
    events = copy_events(tops, 7, ids, value)
    # head (0, 0) looks at position 3 (a value position holding 7); (0, 1) at position 1 (7, but not the
    # needle); (1, 0) at a value position holding 3, not the generated 7
    assert events[..., 1].tolist() == [[True, False], [False, False]] and events.sum() == 1
    assert copy_events(tops, 8, ids, value).sum() == 0  # a token that is not in the needle


def test_needle_prompts_cover_lengths_and_depths_and_locate_the_value(smol_tokenizer):
    prompts = needle_prompts(smol_tokenizer, [1024, 512], [10, 90], 1, seed=7, chat=True)
    assert [p.key for p in prompts] == ["512/10/0", "512/90/0", "1024/10/0", "1024/90/0"]
    for prompt in prompts:
        assert len(prompt.ids) <= int(prompt.key.split("/")[0])
        assert smol_tokenizer.decode([prompt.ids[i] for i in prompt.value_positions]).strip() == prompt.value
    early, late = prompts[0], prompts[1]
    assert early.value_positions[0] < len(early.ids) / 2 < late.value_positions[0]


def test_gate_prompts_of_other_tasks_are_keyed_apart(smol_tokenizer):
    book = needle_prompts(smol_tokenizer, [512], [50], 1, seed=7, chat=True)[0]
    noise = needle_prompts(smol_tokenizer, [512], [50], 1, seed=7, chat=True, task="niah_single")[0]
    passkey = needle_prompts(smol_tokenizer, [512], [50], 1, seed=7, chat=True, task="passkey")[0]
    assert (book.key, noise.key, passkey.key) == ("512/50/0", "niah_single/512/50/0", "passkey/512/50/0")
    assert "grass is green" in noise.sample.prompt and "grass is green" not in book.sample.prompt
    assert "pass key" in passkey.sample.prompt
    for prompt in (noise, passkey):
        assert smol_tokenizer.decode([prompt.ids[i] for i in prompt.value_positions]).strip() == prompt.value
    with pytest.raises(ValueError, match="calibration task"):
        needle_prompts(smol_tokenizer, [512], [50], 1, seed=7, chat=True, task="vt")


def tiny_loaded() -> tuple[LoadedModel, Runner]:
    model, info, _ = make_tiny("llama")
    loaded = LoadedModel(model, byte_tokenizer(), info)
    return loaded, Runner(model, info, prefill_chunk_tokens=128)


def test_calibration_resumes_from_its_per_prompt_results(tmp_path, monkeypatch):
    loaded, runner = tiny_loaded()
    partial = tmp_path / "p.partial.jsonl"
    first = calibrate_cli.calibrate(loaded, runner, [400], [20, 80], 1, 42, True, partial)
    lines = partial.read_text().splitlines()
    assert len(lines) == 2 and first["prompts"] == 2
    assert len(first["scores"]) == 2 and len(first["scores"][0]) == 4  # tiny: 2 layers x 4 heads
    RetrievalProfile.from_dict({"model": "tiny", "weights_sha256": "x", **first})

    probed = []
    original = probe_module.probe_prompt

    def counting(*args, **kwargs):
        probed.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(probe_module, "probe_prompt", counting)
    again = calibrate_cli.calibrate(loaded, runner, [400], [20, 80], 1, 42, True, partial)
    assert probed == [] and again == first  # nothing measured twice
    more = calibrate_cli.calibrate(loaded, runner, [400], [20, 50, 80], 1, 42, True, partial)
    assert len(probed) == 1 and more["prompts"] == 3 and len(partial.read_text().splitlines()) == 3
    partial.write_text(partial.read_text() + '{"key": "torn')  # an interrupted write is ignored
    assert calibrate_cli.read_partial(partial).keys() == {"400/20/0", "400/50/0", "400/80/0"}


def test_calibrate_is_a_kvmux_subcommand():
    args = build_parser().parse_args(["calibrate", "--lengths", "1K,2K", "--out", "x.json"])
    assert args.func is calibrate_cli.cmd_calibrate and args.lengths == [1024, 2048] and args.samples == 1
    assert not args.raw and build_parser().parse_args(["calibrate", "--raw"]).raw


def test_prompts_use_the_chat_template_unless_raw_is_asked(smol_tokenizer):
    assert calibrate_cli.uses_chat(smol_tokenizer, raw=False) and not calibrate_cli.uses_chat(smol_tokenizer, raw=True)
    assert not calibrate_cli.uses_chat(SimpleNamespace(chat_template=None), raw=False)  # no template: plain prompts
    chat, raw = (needle_prompts(smol_tokenizer, [512], [50], 1, 7, chat=c, task="passkey")[0] for c in (True, False))
    assert chat.value == raw.value and chat.sample.prompt_sha256 != raw.sample.prompt_sha256


@pytest.mark.model
def test_the_embedded_model_copies_the_needle_through_a_few_heads(smollm):
    prompt = needle_prompts(smollm.tokenizer, [1024], [50], 1, seed=3, chat=True)[0]
    result = probe_prompt(smollm.runner(512), smollm.info, prompt.ids, prompt.value_positions)
    assert prompt.value in smollm.tokenizer.decode(result.generated)
    scores = result.scores()
    assert scores.shape == (smollm.info.num_layers, smollm.info.num_heads)
    assert float(scores.max()) >= 0.5  # some head copies most of the value
    assert int((scores > 0).sum()) < scores.numel() / 4  # and only a few heads copy at all
