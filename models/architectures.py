"""Architectures kvmux's policies support: decoder-only RoPE + GQA models of the Llama family."""

from __future__ import annotations

SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2/3, SmolLM2, TinyLlama",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3 (q/k-norm)",
}


class UnsupportedModelError(RuntimeError):
    """The model's architecture is not one the KV policies can run on."""


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        names = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise UnsupportedModelError(
            f"Model type '{model_type}' is not supported by kvmux's KV policies; supported: {names}."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", "default") not in {
        "default",
        "linear",
        "dynamic",
        "llama3",
        "yarn",
        "longrope",
    }:
        raise UnsupportedModelError(f"RoPE type '{rope.get('rope_type')}' is not supported.")
