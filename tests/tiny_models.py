"""Tiny random-weight Llama / Qwen2 / Qwen3 models for exact, fast policy tests (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from kvmux.models.info import ModelInfo
from kvmux.models.runner import Runner
from kvmux.policies.hook import install_attention

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    head_dim=16,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON),
}


def make_tiny(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """(model, info, runner) for a tiny random model with the kvmux attention installed."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    install_attention(model)
    info = ModelInfo.from_model(model, served_name=f"tiny-{arch}", root="random")
    return model, info, Runner(model, info, prefill_chunk_tokens=64)


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def byte_tokenizer():
    """A 256-token byte-level tokenizer (one token per byte) that fits the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_engine(prefill_chunk_tokens: int = 16, model_overrides: dict | None = None, **engine_kwargs):
    """An Engine around a tiny random Llama with a byte tokenizer and the repository's presets
    (`model_overrides` change the model config, e.g. its number of layers)."""
    from pathlib import Path

    from kvmux.models.loader import LoadedModel
    from kvmux.policies.presets import load_presets
    from kvmux.server.engine import Engine

    model, info, _ = make_tiny("llama", **(model_overrides or {}))
    tokenizer = byte_tokenizer()
    info = ModelInfo.from_model(model, served_name="tiny-llama", root="random", tokenizer=tokenizer)
    presets = load_presets(Path(__file__).resolve().parents[1] / "configs" / "policies")
    loaded = LoadedModel(model=model, tokenizer=tokenizer, info=info)
    return Engine(loaded, presets, prefill_chunk_tokens=prefill_chunk_tokens, **engine_kwargs)
