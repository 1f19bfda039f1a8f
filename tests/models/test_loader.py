"""Model loading: clear one-sentence failures for missing or unsupported models."""

from __future__ import annotations

import json

import pytest
from transformers import GPT2Config

from kvmux.models.architectures import UnsupportedModelError, check_supported
from kvmux.models.embedded import ModelNotFoundError
from kvmux.models.loader import ModelSpec, load_model, resolve_dtype
from tests.tiny_models import CONFIGS


def test_missing_hub_model_fails_offline_with_clear_message():
    with pytest.raises(ModelNotFoundError, match="could not be loaded.*local cache"):
        load_model(ModelSpec(model="no-such-org/no-such-model-kvmux"))


def test_missing_folder_and_gguf(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(ModelSpec(model=str(tmp_path / "absent")))
    with pytest.raises(ModelNotFoundError, match="GGUF file"):
        load_model(ModelSpec(model=str(tmp_path / "absent.gguf")))


def test_unsupported_architecture_is_rejected(tmp_path):
    with pytest.raises(UnsupportedModelError, match="gpt2.*not supported"):
        check_supported(GPT2Config())
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(GPT2Config(n_layer=1).to_dict()))
    with pytest.raises(UnsupportedModelError):
        load_model(ModelSpec(model=str(folder)))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_supported_architectures(arch):
    check_supported(CONFIGS[arch]())


def test_local_folder_loads_with_kvmux_attention(tmp_path, tiny_llama):
    model, _, _ = tiny_llama
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    tok.save_pretrained(tmp_path)
    loaded = load_model(ModelSpec(model=str(tmp_path), device="cpu"))
    assert loaded.model.config._attn_implementation == "kvmux"
    assert loaded.info.num_layers == 2 and loaded.info.num_kv_heads == 2
    assert str(resolve_dtype("auto", loaded.info.device)) == "torch.float32"
