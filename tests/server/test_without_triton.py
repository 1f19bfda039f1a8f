"""The policies load, and HiP runs on its PyTorch path, where triton is not installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.server.hostile import ROOT

pytestmark = pytest.mark.model


NO_TRITON = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
from pathlib import Path
from kvmux.policies.presets import load_presets
from kvmux.policies.hip import policy as hip
from kvmux.server.sampling import SamplingParams
from tests.tiny_models import tiny_engine

presets = load_presets(Path(sys.argv[1]))
assert hip.triton_kernels() is None
engine = tiny_engine()
policy = {"preset": "hip", "dense_layers": 0, "mask_k": 8, "block_size_q": 8, "window": 8, "sink_tokens": 2}
out = engine.generate(prompt="abcdefgh" * 12, sampling=SamplingParams(max_tokens=3, temperature=0), kv_policy=policy)
assert out.completion_tokens == 3, out
print("presets", len(presets), sorted(presets))
print("hip", out.kv["policy"], out.completion_tokens)
"""


def test_policies_load_and_hip_runs_without_triton():
    presets_dir = ROOT / "configs" / "policies"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", NO_TRITON, str(presets_dir)], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = len(list(presets_dir.glob("*.yaml")))
    assert f"presets {expected} " in run.stdout and "hip hip 3" in run.stdout, run.stdout
