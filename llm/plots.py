"""PNG figures for reports/: loss curves and attention heatmaps. Only this module imports matplotlib (the guide's
figures, llm/guide/figures.py, take it from here)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
# Text is drawn as written: a "$" pair in a prompt or a token would otherwise be parsed as math, and bad math
# ("$\frac{$") fails the figure.
matplotlib.rcParams["text.parse_math"] = False

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from llm.fileio import atomic_path  # noqa: E402
from llm.history import read_history_csv  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Write `fig` as a PNG at `path` (atomically) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_loss(train_csv: Path, path: Path) -> None:
    """Train and val loss against step, from the train stage's plots/train.csv."""
    rows = read_history_csv(train_csv)
    fig, ax = plt.subplots(figsize=(7, 4))
    for column, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(row.step, getattr(row, column)) for row in rows if getattr(row, column) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=column.replace("_", " "), markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_attention(maps: np.ndarray, labels: list[str], title: str, path: Path) -> None:
    """A grid of heatmaps, layers as rows and heads as columns; maps is (n_layer, n_head, T, T)."""
    save_figure(attention_figure(maps, labels, title), path)


def attention_figure(maps: np.ndarray, labels: list[str] | None, title: str) -> plt.Figure:
    """plot_attention's figure; without labels, no token names on the axes (the frames of an animation)."""
    n_layer, n_head, T, _ = maps.shape
    size = 1.2 + 0.09 * T
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head, size * n_layer), squeeze=False)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
                if labels:
                    ax.set_yticks(range(T), labels, fontsize=5)
            if layer == n_layer - 1 and labels:
                ax.set_xticks(range(T), labels, fontsize=5, rotation=90)
    fig.suptitle(title)
    return fig


def plot_attention_evolution(snapshots: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One row per snapshot (checkpoints in training order, then the final model), one column per layer,
    each cell the attention averaged over heads: how the patterns formed during training."""
    n_layer = snapshots[0][1].shape[0]
    fig, axes = plt.subplots(len(snapshots), n_layer, figsize=(2 * n_layer, 2 * len(snapshots)), squeeze=False)
    for row, (name, maps) in enumerate(snapshots):
        for layer in range(n_layer):
            ax = axes[row][layer]
            ax.imshow(maps[layer].mean(axis=0), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"layer {layer}", fontsize=9)
            if layer == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("attention, mean over heads")
    save_figure(fig, path)
