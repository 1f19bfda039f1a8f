"""The memory roofline of one decode token: how fast decoding could go if it only read memory.

A decode step of a batch-1 request reads every weight once (the input embedding table excepted:
only one row of it is gathered, unless it is tied to the output head, which reads all of it) and
the KV the request keeps. `kvmux bench` measures the machine's memory bandwidth once at start
(`measure_bandwidth`: a large tensor copied, counting read + write bytes, and summed, counting
the bytes read; best of a few tries each, the larger of the two figures is used), and each row
gets bytes per decode token = weight bytes + its median peak KV kept, roofline tokens/s =
bandwidth / those bytes, and the fraction of it the row's median decode rate reaches.

The KV term is the row's peak KV kept (the cache at the last token), an upper bound on what an
average step reads; policies that attend to fewer keys than they keep (sparse attention) read
less. A static cache reads its whole allocation every step, as its row's KV kept says.
"""

from __future__ import annotations

import time
from typing import Any

import torch

MIB = 1024 * 1024


def _best_seconds(fn, tries: int, device: torch.device) -> float:
    fn()  # warm-up: first touch of the pages, allocator
    best = float("inf")
    for _ in range(tries):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device: torch.device, mib: int | None = None, tries: int = 5) -> dict[str, Any]:
    """Memory bandwidth of `device` in bytes/s: a `mib`-MiB fp32 tensor (default 256 on CPU, well
    past the caches, 1024 on a GPU) copied and summed, best of `tries` each."""
    mib = mib or (1024 if device.type == "cuda" else 256)
    numel = mib * MIB // 4
    with torch.inference_mode():
        src = torch.ones(numel, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        size = numel * 4
        copy_s = _best_seconds(lambda: dst.copy_(src), tries, device)
        read_s = _best_seconds(lambda: src.sum(), tries, device)
    copy_bw, read_bw = 2 * size / copy_s, size / read_s
    return {
        "bytes_per_s": max(copy_bw, read_bw),
        "copy_bytes_per_s": copy_bw,
        "read_bytes_per_s": read_bw,
        "tensor_mib": mib,
        "tries": tries,
        "threads": torch.get_num_threads(),
    }


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode token reads: every parameter once (shared ones once), less the
    input embedding table when the output head does not share it (a step gathers one row of it)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed is not None and (head is None or head.weight is not embed.weight):
        total -= embed.weight.numel() * embed.weight.element_size()
    return total


def roofline_figures(
    decode_tokens_per_s: float | None, kv_bytes: float | None, weight_bytes: int, bandwidth: float | None
) -> dict[str, float | None]:
    """bytes/token, roofline tokens/s and the fraction reached, for one row's medians."""
    per_token = weight_bytes + (kv_bytes or 0.0)
    tok_s = bandwidth / per_token if bandwidth and per_token > 0 else None
    fraction = decode_tokens_per_s / tok_s if decode_tokens_per_s and tok_s else None
    return {"bytes_per_token": per_token, "tokens_per_s": tok_s, "fraction": fraction}


def add_roofline(row: dict[str, Any], weight_bytes: int, bandwidth: float | None) -> dict[str, Any]:
    """`row` with a "roofline" entry computed from its summary's medians (None for rows without data)."""
    summary = row.get("summary") or {}
    if row.get("status") != "ok" or "decode_tokens_per_s" not in summary:
        row["roofline"] = None
        return row
    row["roofline"] = roofline_figures(
        summary["decode_tokens_per_s"]["median"], summary["kv_bytes_kept_peak"]["median"], weight_bytes, bandwidth
    )
    return row
