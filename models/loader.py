"""Load a causal LM and its tokenizer: embedded default, hub id, local folder, or .gguf file.

dtype "auto" is bf16 on CUDA and fp32 on CPU; device "auto" is CUDA when available.
`device_map: auto` spreads a model over several GPUs through accelerate. Remote code runs only
when `trust_remote_code` is set. Hub ids are read from the local cache unless downloads are
explicitly allowed, so a server never reaches the network by surprise. The model's retrieval-head
profile, if one exists for its weights (`retrieval_profile.py`), is found here and handed to the
policies in `ModelInfo.retrieval_heads`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvmux.models.architectures import check_supported
from kvmux.models.embedded import EMBEDDED_NAME, ModelNotFoundError, embedded_gguf_path, materialize_gguf
from kvmux.models.info import ModelInfo
from kvmux.models.retrieval_profile import find_profile, weights_sha256
from kvmux.models.runner import Runner

log = logging.getLogger("kvmux.models")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSpec(BaseModel):
    """Which model to serve and how to place it."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="hub id, local folder, or .gguf file; empty = embedded")
    served_name: str | None = Field(None, description="name clients use in `model` (default: derived)")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    device_map: str | None = Field(None, description="'auto' to shard over GPUs with accelerate")
    trust_remote_code: bool = False
    allow_download: bool = Field(False, description="allow fetching a hub id that is not cached")
    max_model_len: int | None = Field(None, ge=16, description="override the context length")
    prefill_chunk_tokens: int = Field(2048, ge=16, description="tokens per prefill forward")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo

    def runner(self, prefill_chunk_tokens: int = 2048) -> Runner:
        return Runner(self.model, self.info, prefill_chunk_tokens)


def eos_token_ids(*sources) -> set[int]:
    """End-of-sequence ids named by `eos_token_id` on any of `sources` (configs, tokenizers); int or list."""
    ids: set[int] = set()
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"Device '{device}' was requested but CUDA is not available on this machine.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def model_id(spec: ModelSpec) -> str:
    """The model's id (what a retrieval-head profile is named after): the --model value, or the embedded name."""
    return spec.model or EMBEDDED_NAME


def _source(spec: ModelSpec) -> tuple[str, str]:
    """(folder or hub id, served name)."""
    if not spec.model:
        return str(materialize_gguf(embedded_gguf_path())), spec.served_name or EMBEDDED_NAME
    path = Path(spec.model).expanduser()
    if spec.model.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file '{spec.model}' does not exist.")
        return str(materialize_gguf(path)), spec.served_name or path.stem
    if path.is_dir():
        return str(path), spec.served_name or path.name
    if path.is_absolute() or spec.model.startswith("."):
        raise ModelNotFoundError(f"Model folder '{spec.model}' does not exist.")
    return spec.model, spec.served_name or spec.model


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the model described by `spec`; raise one clear error if that is impossible."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, served_name = _source(spec)
    offline = not spec.allow_download
    common = {"trust_remote_code": spec.trust_remote_code, "local_files_only": offline}
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        hint = " (not in the local cache; set allow_download or pre-fetch it)" if offline else ""
        raise ModelNotFoundError(f"Model '{spec.model}' could not be loaded{hint}: {exc}") from None
    check_supported(config)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    kwargs = dict(common, dtype=dtype)
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    log.info("loading %s (%s, %s)", served_name, dtype, spec.device_map or device)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not spec.device_map:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    profile = find_profile(weights_sha256(model), config.num_hidden_layers, config.num_attention_heads)
    if profile is not None:
        log.info("retrieval-head profile: %s", profile.source)
    info = ModelInfo.from_model(
        model,
        served_name=served_name,
        root=str(source),
        max_len=spec.max_model_len,
        tokenizer=tokenizer,
        retrieval_heads=profile,
    )
    from kvmux.policies.hook import install_attention

    install_attention(model)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
