"""Fixtures for the eval tests: the embedded model's real tokenizer (no weights needed)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from kvmux.models.embedded import embedded_gguf_path, materialize_gguf

    return AutoTokenizer.from_pretrained(materialize_gguf(embedded_gguf_path()))
