"""Dense attention: every path (one pass, chunk after a prefix, decode) equals an explicit masked softmax."""

from __future__ import annotations

import pytest
import torch

from kvmux.policies.dense import attention_probs, causal_mask, repeat_kv, sdpa
from kvmux.policies.hook import causal_or_none
from kvmux.policies.split_decode import split_decode, split_parts


def reference(query, key, value, scaling):
    probs = attention_probs(query, key, scaling)  # fp32, bottom-right causal
    groups = query.shape[1] // key.shape[1]
    out = torch.matmul(probs, value.float().repeat_interleave(groups, dim=1))
    return out.transpose(1, 2).to(query.dtype)


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("tq,tk", [(1, 40), (17, 17), (17, 40), (64, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_without_mask_is_bottom_right_causal(heads, tq, tk, dtype):
    gen = torch.Generator().manual_seed(tq * tk)
    hq, hkv = heads
    q = torch.randn(2, hq, tq, 16, generator=gen).to(dtype)
    k, v = (torch.randn(2, hkv, tk, 16, generator=gen).to(dtype) for _ in range(2))
    got = sdpa(q, k, v, None, 0.25)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(got, reference(q, k, v, 0.25), **tol)
    explicit = sdpa(q, k, v, causal_mask(tq, tk, q.device), 0.25)
    torch.testing.assert_close(got, explicit, **tol)


def test_sdpa_reads_strided_cache_views():
    gen = torch.Generator().manual_seed(0)
    buffer_k, buffer_v = torch.randn(1, 2, 100, 8, generator=gen), torch.randn(1, 2, 100, 8, generator=gen)
    q = torch.randn(1, 4, 10, 8, generator=gen)
    k, v = buffer_k[:, :, :60], buffer_v[:, :, :60]  # what a growable cache layer hands the attention
    torch.testing.assert_close(sdpa(q, k, v, None, 0.3), sdpa(q, k.contiguous(), v.contiguous(), None, 0.3))


def test_mask_function_skips_only_the_plain_causal_mask():
    assert causal_or_none(1, 16, 48, q_offset=32) is None
    assert causal_or_none(1, 1, 48, q_offset=47) is None
    padded = causal_or_none(1, 16, 48, q_offset=32, attention_mask=torch.ones(1, 48, dtype=torch.bool))
    assert padded is not None and padded.shape == (1, 1, 16, 48)

    def window(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 8)

    sliding = causal_or_none(1, 16, 48, q_offset=32, mask_function=window)
    assert sliding is not None and not bool(sliding[0, 0, -1, 0])


def test_decode_row_with_gqa_reads_each_key_once_and_matches_per_head_attention():
    torch.manual_seed(3)
    query, key, value = torch.randn(2, 6, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    out = sdpa(query, key, value, None, 0.25)  # [B, 1, Hq, D]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 3), repeat_kv(value, 3), scale=0.25
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("length", [2048, 2049, 4095, 4096, 3001])
@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_decode_windows_equal_one_pass_over_every_key(length, parts, dtype):
    gen = torch.Generator().manual_seed(length + parts)
    # a growable cache layer's view: the first `length` slots of a larger buffer
    buf_k, buf_v = (torch.randn(1, 3, length + 37, 16, generator=gen).to(dtype) for _ in range(2))
    key, value = buf_k[:, :, :length], buf_v[:, :, :length]
    folded = torch.randn(1, 3, 3, 16, generator=gen).to(dtype)
    got = split_decode(folded, key, value, 0.25, parts)
    expected = torch.nn.functional.scaled_dot_product_attention(folded.float(), key.float(), value.float(), scale=0.25)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(got.float(), expected, **tol)


def test_split_decode_counts_an_overlapping_key_once():
    # one key far more attended than the rest, in the overlap of two windows (length 2049: keys 1024)
    key, value = torch.zeros(1, 1, 2049, 4), torch.zeros(1, 1, 2049, 4)
    key[0, 0, 1024], value[0, 0, 1024] = 10.0, 1.0
    folded = torch.ones(1, 1, 1, 4)
    got = split_decode(folded, key, value, 1.0, 2)
    expected = torch.nn.functional.scaled_dot_product_attention(folded, key, value, scale=1.0)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "kv_heads,keys,threads,parts",
    [(3, 8192, 2, 2), (3, 8192, 1, 1), (8, 8192, 2, 1), (8, 32768, 16, 2), (3, 3000, 2, 1), (3, 65536, 16, 8)],
)
def test_split_parts_balances_kv_heads_over_threads(kv_heads, keys, threads, parts):
    assert split_parts(kv_heads, keys, threads) == parts


def test_decode_row_on_many_keys_uses_the_split_and_equals_the_plain_call(monkeypatch):
    import kvmux.policies.dense as dense

    calls = []
    real = dense.split_decode
    monkeypatch.setattr(dense, "split_decode", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(1, 9, 1, 16, generator=gen)
    key, value = (torch.randn(1, 3, 4200, 16, generator=gen) for _ in range(2))
    out = sdpa(query, key, value, None, 0.25)
    assert calls == [2]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 3), repeat_kv(value, 3), scale=0.25
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected)
