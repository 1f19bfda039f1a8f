"""The heat-map of a retrieval-head profile: layers x query heads, the best heads marked."""

from __future__ import annotations

from pathlib import Path

from kvmux.evals.helpers import pyplot, save_figure
from kvmux.models.retrieval_profile import RetrievalProfile


def plot_profile(profile: RetrievalProfile, path: Path, marked: int = 16, title: str = "") -> Path:
    """Write a PNG of the scores; the `marked` best heads get their rank printed in their cell."""
    plt = pyplot()
    scores = profile.tensor().numpy()
    fig, ax = plt.subplots(figsize=(2.2 + 0.45 * profile.num_heads, 1.2 + 0.22 * profile.num_layers))
    image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(scores.max()), 1e-6))
    for rank, (layer, head) in enumerate(profile.top_heads(marked), start=1):
        ax.text(head, layer, str(rank), ha="center", va="center", fontsize=6, color="white")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(profile.num_heads))
    ax.set_yticks(range(0, profile.num_layers, 2))
    ax.set_title(title or f"retrieval score per head: {profile.model}", fontsize=9)
    fig.colorbar(image, ax=ax, label="copy-paste retrieval score")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)
