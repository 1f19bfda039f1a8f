"""Fixtures shared by the policy tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread_for_tiny_models(request):
    """Tiny models are dominated by per-op overhead, which extra threads only add to (tests marked
    `model` keep the default threads). Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    if request.node.get_closest_marker("model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
