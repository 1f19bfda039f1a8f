"""A lean decode step for the Llama family: transformers' arithmetic without its per-call machinery.

A one-token step through the model's own forward spends a noticeable share of its time in
nn.Module calls, decorators, keyword plumbing, config lookups and mask building that a decode row
does not need (measured in docs/results/fast_core.md). `LeanDecoder` runs the same operations on
the same weights directly, layer by layer: RMSNorm, the q/k/v projections (with Qwen2's biases and
Qwen3's per-head q/k norms), the model's own rotary module, the cache's `update`, kvmux's attention
function (so every policy, interrupt and batched-row rule applies unchanged), the output projection
and the gated MLP, then the final norm and the LM head on the last position.

It serves decode steps (one token per row). Prefill, and every model it does not recognise (another
architecture, sliding-window layers, an unexpected module layout, quantized or wrapped projections,
a model sharded over devices), go through the model's forward. Tests hold it to that forward:
logits within fp32 rounding, bf16 bit-equal, greedy tokens equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvmux.policies.hook import kvmux_attention

LEAN_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_NORMS = ("input_layernorm", "post_attention_layernorm")
_PROJECTIONS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalised in fp32, cast back, then scaled by the weight."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, norm.variance_epsilon).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' half-split layout: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@dataclass
class _Layer:
    attention: nn.Module
    input_norm: nn.Module
    post_norm: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


def _part(module: nn.Module, dotted: str) -> nn.Module | None:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _has(module: nn.Module, dotted: str) -> bool:
    return _part(module, dotted) is not None


def _plain_layer(layer: nn.Module) -> bool:
    """Both norms present, and every projection a plain `nn.Linear` (not a quantized or wrapped one)."""
    norms_present = all(_has(layer, name) for name in _NORMS)
    return norms_present and all(type(_part(layer, name)) is nn.Linear for name in _PROJECTIONS)


def _one_device(model: nn.Module) -> bool:
    """False for a model sharded over devices (accelerate's hooks move activations between layers)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return len({str(device) for device in device_map.values()}) <= 1


class LeanDecoder:
    """Decode steps of a supported model (`for_model`), run without its forward's machinery."""

    def __init__(self, model: nn.Module):
        inner = model.model
        self.model = model
        self.inner = inner
        self.head_dim = inner.layers[0].self_attn.head_dim
        self.layers = [
            _Layer(
                attention=layer.self_attn,
                input_norm=layer.input_layernorm,
                post_norm=layer.post_attention_layernorm,
                q_norm=getattr(layer.self_attn, "q_norm", None),
                k_norm=getattr(layer.self_attn, "k_norm", None),
                q_proj=layer.self_attn.q_proj,
                k_proj=layer.self_attn.k_proj,
                v_proj=layer.self_attn.v_proj,
                o_proj=layer.self_attn.o_proj,
                gate_proj=layer.mlp.gate_proj,
                up_proj=layer.mlp.up_proj,
                down_proj=layer.mlp.down_proj,
            )
            for layer in inner.layers
        ]

    @classmethod
    def for_model(cls, model: nn.Module) -> LeanDecoder | None:
        """A lean decoder when `model` is a Llama-family causal LM it reproduces exactly, else None."""
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if config is None or inner is None or getattr(config, "model_type", None) not in LEAN_MODEL_TYPES:
            return None
        if getattr(config, "sliding_window", None) is not None and config.model_type == "mistral":
            return None
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            return None
        if getattr(config, "hidden_act", None) != "silu" or not all(
            _has(inner, name) for name in ("embed_tokens", "norm", "rotary_emb")
        ):
            return None
        if not _has(model, "lm_head") or len(inner.layers) != config.num_hidden_layers:
            return None
        if not _one_device(model) or not all(_plain_layer(layer) for layer in inner.layers):
            return None
        return cls(model)

    def _heads(self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        shape = (x.shape[0], 1, -1, self.head_dim)
        q = F.linear(x, layer.q_proj.weight, layer.q_proj.bias).view(shape)
        k = F.linear(x, layer.k_proj.weight, layer.k_proj.bias).view(shape)
        v = F.linear(x, layer.v_proj.weight, layer.v_proj.bias).view(shape)
        if layer.q_norm is not None:
            q, k = rms_norm(q, layer.q_norm), rms_norm(k, layer.k_norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, **attention_kwargs) -> torch.Tensor:
        """One token per row: ids and positions [B, 1] -> logits [B, 1, V] (the model's dtype).

        `cache` gets each layer's new keys and values through `update`; `attention_kwargs` (the
        request's `kvmux_session`, or a batched step's `kvmux_batch`) reach kvmux's attention function.
        """
        hidden = self.inner.embed_tokens(input_ids)
        cos, sin = self.inner.rotary_emb(hidden, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        for index, layer in enumerate(self.layers):
            attn = layer.attention
            q, k, v = self._heads(layer, rms_norm(hidden, layer.input_norm), cos, sin)
            k, v = cache.update(k, v, index)
            out, _ = kvmux_attention(attn, q, k, v, None, attn.scaling, position_ids=position_ids, **attention_kwargs)
            hidden = hidden + F.linear(out.reshape(*hidden.shape[:2], -1), layer.o_proj.weight, layer.o_proj.bias)
            x = rms_norm(hidden, layer.post_norm)
            gate = F.silu(F.linear(x, layer.gate_proj.weight, layer.gate_proj.bias))
            up = F.linear(x, layer.up_proj.weight, layer.up_proj.bias)
            hidden = hidden + F.linear(gate * up, layer.down_proj.weight, layer.down_proj.bias)
        return self.model.lm_head(rms_norm(hidden, self.inner.norm))
