"""Growable KV layers: append in place, same contents as torch.cat, adopt evicted tensors, roll back."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvmux.policies.kv_buffer import MIN_SPARE_TOKENS, GrowableCache, GrowableLayer


def kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 8, generator=generator), torch.randn(1, 2, n, 8, generator=generator)


def test_appends_equal_concatenation_and_reuse_the_buffer():
    layer, keys, values = GrowableLayer(), [], []
    pointers = set()
    for step, n in enumerate([100, 1, 1, 37, 1, 300, 1]):
        k, v = kv(n, step)
        keys.append(k)
        values.append(v)
        got_k, got_v = layer.update(k, v)
        torch.testing.assert_close(got_k, torch.cat(keys, dim=-2), rtol=0, atol=0)
        torch.testing.assert_close(got_v, torch.cat(values, dim=-2), rtol=0, atol=0)
        assert layer.get_seq_length() == got_k.shape[-2] == layer.keys.shape[-2]
        pointers.add(layer._key_buffer.data.data_ptr())
    assert len(pointers) <= 3  # reallocated only when full, not per append
    assert layer.reserved_bytes() >= 2 * layer.keys.numel() * 4


def test_one_token_appends_write_in_place():
    layer = GrowableLayer()
    layer.update(*kv(10, 0))
    pointer = layer._key_buffer.data.data_ptr()
    for step in range(MIN_SPARE_TOKENS - 1):
        layer.update(*kv(1, step + 1))
    assert layer._key_buffer.data.data_ptr() == pointer and layer.get_seq_length() == 10 + MIN_SPARE_TOKENS - 1


def test_assigning_a_tensor_adopts_it_and_a_prefix_view_shortens():
    layer = GrowableLayer()
    layer.update(*kv(50, 0))
    evicted_k, evicted_v = layer.keys[..., ::2, :].contiguous(), layer.values[..., ::2, :].contiguous()
    layer.keys, layer.values = evicted_k, evicted_v  # what an eviction policy does
    assert layer.get_seq_length() == 25 and torch.equal(layer.keys, evicted_k)
    new_k, new_v = kv(1, 9)
    got_k, _ = layer.update(new_k, new_v)
    torch.testing.assert_close(got_k, torch.cat([evicted_k, new_k], dim=-2), rtol=0, atol=0)
    pointer = layer._key_buffer.data.data_ptr()
    layer.keys, layer.values = layer.keys[..., :20, :], layer.values[..., :20, :]  # a rollback
    assert layer.get_seq_length() == 20 and layer._key_buffer.data.data_ptr() == pointer
    torch.testing.assert_close(layer.keys, evicted_k[..., :20, :], rtol=0, atol=0)


def test_cache_keeps_sliding_layers_and_makes_full_layers_growable(tiny):
    _, info, _ = tiny
    cache = GrowableCache(config=info.config)
    reference = DynamicCache(config=info.config)
    assert len(cache.layers) == len(reference.layers)
    for mine, theirs in zip(cache.layers, reference.layers, strict=True):
        assert isinstance(mine, GrowableLayer) == (type(theirs).__name__ == "DynamicLayer")
    k, v = kv(5, 1)
    cache.update(k, v, 0)
    assert cache.get_seq_length(0) == 5
