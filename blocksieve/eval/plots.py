"""Figures of an evaluation run (matplotlib, Agg backend, PNG files).

* :func:`passkey_heatmap` — passkey accuracy of one method over lengths × depths.
* :func:`pareto` — fidelity (mean recall of dense attention mass) against density, one line per
  method through its points (lengths or configs), dense at (1, 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["passkey_heatmap", "pareto"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def passkey_heatmap(accuracy: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float], title: str, path) -> Path:
    """Write a heatmap PNG: rows = lengths, columns = depths, colour = accuracy in [0, 1]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 + 0.9 * len(depths)), max(3.0, 1.6 + 0.6 * len(lengths))))
    im = ax.imshow(accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("depth of the key in the filler")
    ax.set_ylabel("prompt length (tokens)")
    for i, row in enumerate(accuracy):
        for j, acc in enumerate(row):
            ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto(points: Mapping[str, Sequence[tuple]], title: str, path) -> Path:
    """Write a recall-vs-density PNG.

    Args:
        points: ``{method label: [(density, recall, point label), ...]}``; each method is drawn as
            one line through its points sorted by density, each point annotated with its label.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for label, pts in points.items():
        pts = sorted(pts)
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=label)
        for x, y, name in pts:
            ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("density (fraction of causal query-key pairs kept)")
    ax.set_ylabel("recall of dense attention mass (mean)")
    ax.set_xlim(0.0, 1.05)
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
