"""The lean decode step computes what the model's own forward computes, and stays out of what it does not know."""

from __future__ import annotations

import pytest
import torch

from kvmux.models.lean_decode import LeanDecoder
from kvmux.models.runner import Runner
from tests.policies.helpers import new_session, run_prefill
from tests.tiny_models import make_tiny


def _teacher_forced(runner: Runner, info, prompt: torch.Tensor, tokens: list[int], preset: str = "full", **params):
    session = new_session(preset, info, **params)
    rows = [run_prefill(session, runner, prompt)]
    rows += [session.decode(runner, token) for token in tokens]
    return torch.stack(rows), session


@pytest.mark.parametrize(
    ("preset", "params"),
    [("full", {}), ("streaming_llm", {"sink_tokens": 2, "window": 16}), ("lazy_eviction", {"budget": 24, "window": 4})],
)
def test_lean_decode_logits_equal_the_model_forward(tiny, preset, params):
    model, info, lean_runner = tiny
    assert lean_runner.lean is not None  # every tiny architecture (Llama, Qwen2 biases, Qwen3 q/k norms)
    stock_runner = Runner(model, info, lean_runner.prefill_chunk_tokens, lean_decode=False)
    prompt = torch.randint(0, 256, (1, 37))
    tokens = [int(t) for t in torch.randint(0, 256, (20,))]
    lean, lean_session = _teacher_forced(lean_runner, info, prompt, tokens, preset, **params)
    stock, stock_session = _teacher_forced(stock_runner, info, prompt, tokens, preset, **params)
    torch.testing.assert_close(lean, stock, atol=1e-5, rtol=1e-5)
    assert lean_session.stats().tokens_kept == stock_session.stats().tokens_kept


@pytest.mark.parametrize(("arch", "overrides"), [("qwen2", {}), ("llama", {"mlp_bias": True, "attention_bias": True})])
def test_lean_decode_applies_projection_biases(arch, overrides):
    model, info, runner = make_tiny(arch, **overrides)
    assert runner.lean is not None
    with torch.no_grad():  # transformers initialises biases to zero; make them count
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    stock_runner = Runner(model, info, runner.prefill_chunk_tokens, lean_decode=False)
    prompt, tokens = torch.randint(0, 256, (1, 20)), [int(t) for t in torch.randint(0, 256, (6,))]
    lean, _ = _teacher_forced(runner, info, prompt, tokens)
    stock, _ = _teacher_forced(stock_runner, info, prompt, tokens)
    torch.testing.assert_close(lean, stock, atol=1e-5, rtol=1e-5)


def test_lean_decode_in_bf16_rounds_like_the_model():
    model, info, runner = make_tiny("qwen3", dtype=torch.bfloat16)
    stock_runner = Runner(model, info, runner.prefill_chunk_tokens, lean_decode=False)
    prompt = torch.randint(0, 256, (1, 25))
    tokens = [int(t) for t in torch.randint(0, 256, (8,))]
    lean, _ = _teacher_forced(runner, info, prompt, tokens)
    stock, _ = _teacher_forced(stock_runner, info, prompt, tokens)
    torch.testing.assert_close(lean, stock, atol=0, rtol=0)


def test_decode_steps_do_not_call_the_model_forward(tiny_llama, monkeypatch):
    model, info, runner = tiny_llama
    session = new_session("full", info)
    run_prefill(session, runner, torch.randint(0, 256, (1, 12)))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model's forward ran a decode step"))
    assert session.decode(runner, 5).shape == (256,)
    runner.decode_batch([session], [7])


def test_other_attention_implementations_use_the_model_forward(tiny_llama):
    model, info, runner = tiny_llama
    one = torch.tensor([[3]])
    assert runner.lean_for(one) is runner.lean
    assert runner.lean_for(torch.tensor([[3, 4]])) is None  # prefill chunks use the forward
    model.set_attn_implementation("sdpa")
    try:
        assert runner.lean_for(one) is None
    finally:
        model.set_attn_implementation("kvmux")


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("qwen2", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}),
        ("llama", {"hidden_act": "gelu"}),
    ],
)
def test_models_it_does_not_reproduce_keep_their_forward(arch, overrides):
    model, _, _ = make_tiny(arch, **overrides)
    assert LeanDecoder.for_model(model) is None


def test_a_mistral_with_a_sliding_window_keeps_its_forward():
    from transformers import AutoModelForCausalLM, MistralConfig

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    common |= dict(num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    windowed = AutoModelForCausalLM.from_config(MistralConfig(**common, sliding_window=8))
    unwindowed = AutoModelForCausalLM.from_config(MistralConfig(**common, sliding_window=None))
    assert LeanDecoder.for_model(windowed) is None
    assert LeanDecoder.for_model(unwindowed) is not None


def test_quantized_or_sharded_models_keep_their_forward():
    class WrappedLinear(torch.nn.Linear):  # what a quantization library puts in place of nn.Linear
        pass

    model, _, _ = make_tiny("llama")
    assert LeanDecoder.for_model(model) is not None
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    assert LeanDecoder.for_model(model) is None
    model.hf_device_map = {"": 0}
    assert LeanDecoder.for_model(model) is not None
    old = model.model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.up_proj = WrappedLinear(old.in_features, old.out_features, bias=False)
    assert LeanDecoder.for_model(model) is None
