"""Presets that need a retrieval-head profile, over real HTTP on a tiny model that has none: a clear 400
naming the parameter, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from kvmux.server.config import ServerConfig
from kvmux.server.serve import create_app
from tests.server.conftest import LiveServer, free_port
from tests.tiny_models import tiny_engine


@pytest.fixture(scope="module")
def server():
    app = create_app(ServerConfig(), engine=tiny_engine(prefill_chunk_tokens=16))
    with LiveServer(app, free_port()) as live:
        yield live


def _complete(server, kv_policy) -> httpx.Response:
    body = {"model": "tiny-llama", "prompt": "Some text.\n\nWhat is it?", "max_tokens": 2, "kv_policy": kv_policy}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=120)


@pytest.mark.parametrize(
    ("kv_policy", "param"),
    [
        ("hip_rh", "kv_policy.retrieval_heads"),
        ("flexprefill_rh", "kv_policy.retrieval_heads"),
        ({"preset": "hip", "retrieval_heads": 2}, "kv_policy.retrieval_heads"),
        ({"preset": "hip", "gate_heads": 2}, "kv_policy.gate_heads"),
        ("hip_rh_gate", "kv_policy.retrieval_heads"),
        ("hip_rh_gate_exact10", "kv_policy.retrieval_heads"),
        ({"preset": "flexprefill", "gate_heads": 2}, "kv_policy.gate_heads"),
        ("infiniretri_calibrated", "kv_policy.layer"),
    ],
)
def test_a_preset_asking_for_a_missing_profile_gets_a_400(server, kv_policy, param):
    refused = _complete(server, kv_policy)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", param, 400)
    assert "retrieval-head profile" in error["message"] and "kvmux calibrate" in error["message"]
    assert _complete(server, "hip").status_code == 200  # and the server keeps serving
