"""HiP's Triton kernels (search and sparse attention) against the PyTorch paths and a dense-mask oracle.

Off CUDA the kernels run through Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET), so
shapes stay small: the interpreter executes every program op by op.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvmux.policies.base import PolicyInputError
from kvmux.policies.hip import policy as hip
from kvmux.policies.hip import triton_search as hip_triton  # triton is a test dependency
from kvmux.policies.hip.search import hip_search
from kvmux.policies.sparse import SparseGeometry
from kvmux.policies.sparse import triton_attention as sparse_triton
from tests.policies.helpers import new_session, run_prefill, stepwise_logits
from tests.policies.test_hip import SMALL
from tests.policies.test_sparse import selection_oracle

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_attention(q, k, v, sel, geo, scaling, **kwargs):
    return sparse_triton.attention(
        q, k, v, sparse_triton.pack(sel), block_q=geo.block_q, block_k=geo.block_k, sinks=geo.sinks,
        window=geo.window, scaling=scaling, block_n=32, **kwargs,
    )  # fmt: skip


CASES = [
    # tq, tk, b_q, b_k, sinks, window, K_b, Hq, Hkv
    (40, 230, 16, 2, 5, 20, 16, 2, 1),  # chunk after a cached prefix, partial last query block
    (48, 48, 16, 2, 4, 8, 16, 2, 2),  # prefill from empty: windows start before key 0, dense fallback rows
    (1, 400, 1, 2, 16, 30, 16, 4, 2),  # decode shape (one query, b_q 1)
    (20, 300, 32, 1, 0, 12, 32, 1, 1),  # no sinks, b_k 1, one query block wider than the queries
]


@pytest.mark.parametrize("tq,tk,bq,bk,sinks,window,groups,hq,hkv", CASES)
def test_triton_search_selects_what_the_pytorch_search_selects(tq, tk, bq, bk, sinks, window, groups, hq, hkv):
    torch.manual_seed(tq * 7 + tk)
    q, k = torch.randn(1, hq, tq, 24), torch.randn(1, hkv, tk, 24)
    geo = SparseGeometry.build(tq, tk, bq, bk, sinks, window, lookahead=0, device=q.device)
    stride = 2 if bq > 1 else 1
    want = hip_search(geo.query_blocks(q), k, geo.lo, geo.hi, groups, bk, query_stride=stride, score_mode="gather")
    assert geo.max_candidates == int((geo.hi - geo.lo).max())
    # all 2 K_b candidates scored in one step, or 16 at a time: the same selection
    for chunk in (2 * groups, 16):
        got = hip_triton.search(q, k, geo, groups, stride, score_chunk=chunk)
        assert got.rounds == want.rounds
        assert torch.equal(got.valid, want.valid)
        assert torch.equal(got.blocks, want.blocks)


def test_search_score_chunk_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        hip_triton.search_constants(64, 32, 2, 256, 2, torch.float32, score_chunk=48)


@pytest.mark.parametrize("tq,tk,bq,bk,sinks,window,groups,hq,hkv", CASES)
def test_triton_attention_matches_dense_mask_oracle(tq, tk, bq, bk, sinks, window, groups, hq, hkv):
    torch.manual_seed(tq + tk)
    q, k, v = torch.randn(2, hq, tq, 24), torch.randn(2, hkv, tk, 24), torch.randn(2, hkv, tk, 24)
    geo = SparseGeometry.build(tq, tk, bq, bk, sinks, window, lookahead=0, device=q.device)
    stride = 2 if bq > 1 else 1
    sel = hip_search(geo.query_blocks(q), k, geo.lo, geo.hi, groups, bk, query_stride=stride, score_mode="table")
    want, want_counts = selection_oracle(q, k, v, sel, geo, 0.3)
    totals = torch.zeros(2, dtype=torch.int64)
    out, counts = run_attention(q, k, v, sel, geo, 0.3, totals=totals, row_counts=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(counts, want_counts)
    assert int(counts.max()) <= sinks + groups * bk + window
    # the running totals the kernel keeps for the session's stats: sum and max over rows
    assert totals.tolist() == [int(want_counts.sum()), int(want_counts.max())]
    out_again, no_counts = run_attention(q, k, v, sel, geo, 0.3, totals=totals)
    assert no_counts is None and torch.equal(out_again, out)
    assert totals.tolist() == [2 * int(want_counts.sum()), int(want_counts.max())]


def test_triton_attention_keeps_bf16_output_dtype_and_fp32_accuracy():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 32) for _ in range(3))
    k, v = torch.randn(1, 1, 150, 32), torch.randn(1, 1, 150, 32)
    geo = SparseGeometry.build(24, 150, 16, 2, 4, 16, lookahead=0, device=q.device)
    sel = hip_search(geo.query_blocks(q), k, geo.lo, geo.hi, 16, 2, query_stride=2)
    want, _ = selection_oracle(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), sel, geo, 0.2)
    out, _ = run_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), sel, geo, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_search_rounds_halve_the_largest_group_until_one_block():
    assert hip_triton.search_rounds(197, 16) == 4  # 197 blocks / 16 groups -> 13 -> 7 -> 4 -> 2 -> 1
    assert hip_triton.search_rounds(16, 16) == 0  # every group already holds <= 1 block
    assert hip_triton.usable_groups(256) and not hip_triton.usable_groups(8) and not hip_triton.usable_groups(48)


def test_session_with_triton_kernels_reproduces_the_pytorch_kernels(tiny_llama):
    """Prefill over sparse layers and decode steps with a mask refresh: same logits either way."""
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 90))
    logits, searches = {}, {}
    for kernel in ("fast", "triton"):
        session = new_session("hip", info, **SMALL, refresh_interval=2, kernel=kernel)
        steps = [run_prefill(session, runner, ids)]
        for _ in range(3):
            steps.append(session.decode(runner, int(steps[-1].argmax())))
        logits[kernel] = torch.stack(steps)
        stats = session.stats().as_dict()
        searches[kernel] = (stats["hip_searches"], stats["attention_density"], stats["hip_max_keys_per_query"])
        assert stats["hip_mask_reuses"] == 2  # 2 layers x the second decode step
        assert stats["hip_max_keys_per_query"] <= 32 + 4 + 16
    assert searches["triton"] == searches["fast"]  # searches, density and max keys per row in the stats
    assert searches["fast"][0] >= 2 * 3  # 2 layers x (prefill chunks + 2 refreshes)
    torch.testing.assert_close(logits["triton"], logits["fast"], atol=2e-5, rtol=1e-4)


def test_auto_kernel_is_fast_on_cpu_and_triton_needs_the_package(tiny_llama, monkeypatch):
    assert hip.resolve_kernel("auto", torch.device("cpu")) == "fast"
    assert hip.resolve_kernel("reference", torch.device("cpu")) == "reference"
    model, info, runner = tiny_llama
    monkeypatch.setattr(hip, "triton_kernels", lambda: None)
    session = new_session("hip", info, **SMALL, kernel="triton")
    with pytest.raises(PolicyInputError, match="triton"):
        run_prefill(session, runner, torch.randint(0, 256, (1, 80)))


def test_auto_falls_back_to_pytorch_when_a_triton_kernel_fails(tiny_llama, monkeypatch, caplog):
    model, info, runner = tiny_llama
    ids = torch.randint(0, 256, (1, 80))
    want = stepwise_logits(new_session("hip", info, **SMALL, kernel="fast"), runner, ids, chunk=80)

    class Broken:
        usable_groups = staticmethod(hip_triton.usable_groups)

        @staticmethod
        def search(*args, **kwargs):
            raise RuntimeError("no kernel image for this device")

    state = hip._triton_state()
    monkeypatch.setattr(state, "usable", True)
    monkeypatch.setattr(hip, "resolve_kernel", lambda kernel, device: "triton")
    monkeypatch.setattr(hip, "triton_kernels", lambda: Broken)
    with caplog.at_level(logging.WARNING, logger="kvmux.policies.hip.policy"):
        got = stepwise_logits(new_session("hip", info, **SMALL), runner, ids, chunk=80)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not state.usable and "unusable" in caplog.text
    explicit = new_session("hip", info, **SMALL, kernel="triton")
    with pytest.raises(RuntimeError, match="no kernel image"):
        run_prefill(explicit, runner, ids)


def test_kernels_compile_for_cuda_without_a_gpu(tmp_path):
    """The real Triton compiler (not the interpreter) lowers the policy's launches to an sm_90 cubin."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    report = tmp_path / "compile.json"
    args = ["--arch", "90", "--head-dims", "128", "--dtypes", "bfloat16", "--json", str(report)]
    done = subprocess.run(
        [sys.executable, "-P", str(SCRIPTS / "compile_hip_kernels.py"), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(report.read_text())["results"]
    assert {row["variant"] for row in rows} == {
        f"{kernel} {phase} D128 bfloat16" for kernel in ("search", "attention") for phase in ("prefill", "decode")
    }
    assert all(row["ok"] and row["shared_bytes"] <= 232448 for row in rows)
