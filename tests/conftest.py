"""Shared fixtures: tiny random models (fast, exact) and the embedded SmolLM2 model (real behaviour)."""

from __future__ import annotations

import os

# Triton kernels (HiP's CUDA path) run through Triton's CPU interpreter in tests, on CPU tensors, on
# every machine; the flag must be set before any kernel is defined. The compiled kernels are checked
# against the PyTorch ones on a GPU by `scripts/hip_kernels.py` (its agreement stage).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import make_tiny  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def tiny(request):
    """(model, info, runner) for each tiny architecture."""
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model, loaded once per test session."""
    from kvmux.models.loader import ModelSpec, load_model

    return load_model(ModelSpec())
