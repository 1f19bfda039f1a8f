"""Rotary position helpers for policies that re-position keys (StreamingLLM, ActQKV).

Llama-family models rotate q and k with `x*cos + rotate_half(x)*sin`, where cos/sin may carry an
`attention_scaling` factor. Rotations compose, so a key stored at position p can be moved to p'
by rotating it by p'-p, or "un-rotated" (rotated by -p) and stored position-free. Un-rotating
keeps the scaling factor inside the stored key, so re-rotating with pure cos/sin is exact.
Angles are computed in fp32 from the model's own inverse frequencies (`exact_cos_sin`: in float64, for
positions that grow without bound).
"""

from __future__ import annotations

import math

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure rotation tables for integer positions [T] -> ([T, D], [T, D]) in fp32."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def exact_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for integer positions [T] -> ([T, D], [T, D]) fp32, angles taken in float64."""
    freqs = positions.double()[:, None] * inv_freq.double().to(positions.device)[None, :]
    freqs = torch.remainder(freqs, 2 * math.pi)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] to `positions` [T] (negative positions un-rotate)."""
    return rotate_with(x, *cos_sin(positions, inv_freq))


def rotate_with(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] with precomputed tables [T, D] (reuse them across layers)."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
