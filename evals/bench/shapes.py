"""Random-weight models built from named shapes, for timing without downloading any weights.

A *shape* is an architecture's configuration without its weights: layer count, head counts, head
size, hidden and MLP widths, vocabulary and RoPE base. `build_random_model("llama3-8b")` creates
the model on the meta device (no memory touched), materialises it directly on the target device
in the requested dtype, and fills it with seeded random weights (normal, std = the config's
`initializer_range`; norms at one), then installs the kvmux attention. Speed and memory of a
random model equal those of the trained one of the same shape; only its outputs are meaningless.

The Llama-3-8B shape follows Meta's published configuration (Llama 3, arXiv 2407.21783, Table 3:
32 layers, model dim 4096, FFN dim 14336, 32 heads, 8 KV heads, vocabulary 128K, RoPE base
500000). Its context is set to 128K tokens (Llama 3.1) with plain RoPE, which costs the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kvmux.models.info import ModelInfo
from kvmux.models.loader import LoadedModel
from kvmux.policies.hook import install_attention


@dataclass(frozen=True)
class Shape:
    """The numbers that decide a decoder's cost."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    max_context: int
    tie_embeddings: bool = False
    description: str = ""

    def config(self, max_context: int | None = None) -> LlamaConfig:
        """A transformers Llama config of this shape (plain RoPE)."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=max_context or self.max_context,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_embeddings,
            rms_norm_eps=1e-5,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape(
            "llama3-8b", 32, 32, 8, 128, 4096, 14336, 128256, 500000.0, 131072,
            description="Llama-3-8B / 3.1-8B (8.0B parameters)",
        ),
        Shape(
            "llama3.2-1b", 16, 32, 8, 64, 2048, 8192, 128256, 500000.0, 131072, tie_embeddings=True,
            description="Llama-3.2-1B (1.2B parameters)",
        ),
        Shape(
            "smollm2-135m", 30, 9, 3, 64, 576, 1536, 49152, 100000.0, 8192, tie_embeddings=True,
            description="SmolLM2-135M, the embedded model's shape",
        ),
        Shape(
            "tiny", 2, 4, 2, 16, 64, 128, 256, 10000.0, 32768,
            description="2-layer toy for CPU smoke tests",
        ),
    )
}  # fmt: skip


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise KeyError(f"unknown shape '{name}'; known shapes: {sorted(SHAPES)}")
    return SHAPES[name]


def meta_model(shape: Shape, dtype: torch.dtype = torch.bfloat16, max_context: int | None = None) -> torch.nn.Module:
    """The model of `shape` on the meta device: structure and parameter shapes, no storage."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(shape.config(max_context), dtype=dtype)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    """Fill every parameter of a materialised model with seeded random values; rebuild RoPE tables.

    Matrices and embeddings ~ N(0, std); 1-D parameters are norm scales (set to one) or biases
    (zero). Non-persistent buffers (the rotary inverse frequencies) are recomputed from the config.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            param.normal_(0.0, std, generator=generator)
        elif "norm" in name:
            param.fill_(1.0)
        else:
            param.zero_()
    rebuilt: set[str] = set()
    for module_name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(module.config)
            for buf_name, buf in fresh.named_buffers(recurse=False):
                getattr(module, buf_name).copy_(buf.to(device))
                rebuilt.add(f"{module_name}.{buf_name}")
    missing = [name for name, _ in model.named_buffers() if name not in rebuilt]
    if missing:
        raise RuntimeError(f"buffers left uninitialised after materialising: {missing}")


def build_random_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_context: int | None = None,
    tokenizer=None,
) -> LoadedModel:
    """A random-weight model of shape `name` on `device`, kvmux attention installed.

    `tokenizer` (optional, any whose ids fit the shape's vocabulary) lets prompts be text and
    serves policies that re-read text.
    """
    shape = get_shape(name)
    device = torch.device(device)
    model = meta_model(shape, dtype, max_context)
    model.to_empty(device=device)
    randomize(model, seed, std=model.config.initializer_range)
    model.eval()
    install_attention(model)
    if tokenizer is not None and len(tokenizer) > shape.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids; shape '{name}' only {shape.vocab_size}")
    info = ModelInfo.from_model(model, served_name=f"random-{name}", root=f"shape:{name}", tokenizer=tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
