"""Retrieval-head profiles: per-model copy-paste scores of every attention head, loaded with the model.

A profile holds, per layer and query head, the retrieval score of Retrieval Heads (Wu et al., 2024,
https://arxiv.org/abs/2404.15574): how often the head's most attended position is the needle token the
model is copying (`kvmux calibrate` measures it, `kvmux.evals.calibrate`). It is keyed by a model id and
a hash of the weights, and found when the model is loaded: first in the cache directory
(`$KVMUX_CACHE_DIR/retrieval_heads/`, where `kvmux calibrate` writes), then among the profiles shipped in
`configs/retrieval_heads/`. Policies read it from `ModelInfo.retrieval_heads`, never from files.

The weights hash covers every tensor's name and shape and a strided sample of at most 4096 of its
values cast to bfloat16, so it is quick for any model size and the same whether the model is loaded in
fp32 or bf16, on CPU or GPU.

A profile may also hold gate gains per sparse policy (`gates`, written by `kvmux calibrate --gates`,
`kvmux.evals.calibrate.gates`): per head, how much making it dense would lower the answer's loss under
that policy; a policy's `gate_heads` reads them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("kvmux.models")

SHIPPED_PROFILES = Path(__file__).resolve().parents[1] / "configs" / "retrieval_heads"
SAMPLE_VALUES = 4096


@dataclass(frozen=True)
class RetrievalProfile:
    """Retrieval scores [layer][query head] in [0, 1] of one model's weights."""

    model: str
    weights_sha256: str
    scores: tuple[tuple[float, ...], ...]
    source: str = ""  # the file it was read from
    gates: dict[str, tuple[tuple[float, ...], ...]] = field(default_factory=dict, compare=False)  # policy: gains

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    @property
    def num_heads(self) -> int:
        return len(self.scores[0]) if self.scores else 0

    def tensor(self) -> torch.Tensor:
        """Scores as fp32 [layers, heads]."""
        return torch.tensor(self.scores, dtype=torch.float32)

    def top_heads(self, count: int) -> list[tuple[int, int]]:
        """The `count` best-scored (layer, head) pairs, best first (ties: lower layer, then head)."""
        flat = self.tensor().flatten()
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:count]
        return [divmod(i, self.num_heads) for i in order]

    def head_mask(self, count: int) -> torch.Tensor:
        """bool [layers, heads]: True for the `count` best-scored heads."""
        mask = torch.zeros(self.num_layers, self.num_heads, dtype=torch.bool)
        for layer, head in self.top_heads(count):
            mask[layer, head] = True
        return mask

    def best_layer(self) -> int:
        """The layer whose heads score highest on average (ties: the lower layer)."""
        return int(torch.argmax(self.tensor().mean(dim=1)))

    def top_layers(self, count: int) -> list[int]:
        """The `count` layers whose heads score highest on average, best first (ties: the lower layer)."""
        means = self.tensor().mean(dim=1).tolist()
        return sorted(range(len(means)), key=lambda layer: (-means[layer], layer))[:count]

    def gate_mask(self, policy: str, count: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """bool [layers, heads]: the `count` heads of largest gate gain for `policy` that are not in `exclude`
        (ties: lower layer, then head); KeyError when the profile has no gains for it."""
        gains = torch.tensor(self.gates[policy], dtype=torch.float32).flatten()
        skip = exclude.flatten().cpu() if exclude is not None else torch.zeros_like(gains, dtype=torch.bool)
        order = sorted((i for i in range(gains.numel()) if not skip[i]), key=lambda i: (-float(gains[i]), i))
        mask = torch.zeros(gains.numel(), dtype=torch.bool)
        mask[order[:count]] = True
        return mask.view(self.num_layers, self.num_heads)

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "weights_sha256": self.weights_sha256,
            "scores": [list(r) for r in self.scores],
            "gates": {policy: {"gains": [list(r) for r in table]} for policy, table in self.gates.items()},
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> RetrievalProfile:
        name = source or data.get("model")
        scores = _table(data["scores"], f"retrieval profile {name}: scores")
        gates = {str(policy): _table(entry["gains"], f"retrieval profile {name}: {policy} gate gains")
                 for policy, entry in data.get("gates", {}).items()}  # fmt: skip
        if any(len(t) != len(scores) or len(t[0]) != len(scores[0]) for t in gates.values()):
            raise ValueError(f"retrieval profile {name}: gate gains must have the scores' shape")
        return cls(str(data["model"]), str(data["weights_sha256"]), scores, source, gates)


def _table(rows, what: str) -> tuple[tuple[float, ...], ...]:
    table = tuple(tuple(float(x) for x in row) for row in rows)
    if not table or len({len(row) for row in table}) != 1:
        raise ValueError(f"{what} must be a [layers][heads] table")
    return table


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of the weights: names, shapes and a strided bf16 sample of each tensor (see the module doc)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.is_meta:  # offloaded by accelerate: no values at hand, the name and shape only
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE_VALUES)
        sample = flat[::step][:SAMPLE_VALUES].to(torch.bfloat16).cpu().view(torch.int16)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def profile_dirs() -> list[Path]:
    """Where profiles are looked for, in order: the cache directory's, then the shipped ones."""
    from kvmux.models.embedded import cache_dir

    return [cache_dir() / "retrieval_heads", SHIPPED_PROFILES]


def profile_file_name(model_id: str, weights: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
    return f"{safe}-{weights[:16]}.json"


def find_profile(weights: str, num_layers: int, num_heads: int) -> RetrievalProfile | None:
    """The first profile of these weights (and this shape) in `profile_dirs()`; None when there is none."""
    for folder in profile_dirs():
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("weights_sha256") != weights:
                    continue
                profile = RetrievalProfile.from_dict(data, str(path))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping retrieval profile %s: %s", path, exc)
                continue
            if (profile.num_layers, profile.num_heads) == (num_layers, num_heads):
                return profile
            log.warning("retrieval profile %s does not match the model's %d x %d heads", path, num_layers, num_heads)
    return None


def write_profile(path: Path, data: dict) -> None:
    """Write a profile (the JSON of `kvmux calibrate`) atomically."""
    RetrievalProfile.from_dict(data)  # refuse to write what could not be read back
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
