"""PNG figures for reports/: loss curves and attention heatmaps. Only this module imports matplotlib (the guide's
figures, llm/guide/figures.py, take it from here)."""

import math
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


MAX_TICKS = 24  # token labels a side at most: 7 pt text needs about 0.1 inch a row


def token_ticks(count: int) -> list[int]:
    """The rows (or columns) that get a token label: all of them, or every k-th when they would not fit."""
    return list(range(0, count, math.ceil(count / MAX_TICKS)))


def plot_attention(maps: np.ndarray, labels: list[str], title: str, path: Path) -> None:
    """attention_figure, with its colour bar, as a PNG."""
    save_figure(attention_figure(maps, labels, title, colorbar=True), path)


def attention_figure(maps: np.ndarray, labels: list[str] | None, title: str, panel: float | None = None,
                     colorbar: bool = False, label_pt: float = 6) -> plt.Figure:
    """Every head of every layer, maps (n_layer, n_head, T, T): layers as rows, heads as columns, the weights on one
    colour scale from 0 to 1 (its colour bar drawn with `colorbar`). Token labels on the first column and the last
    row, as many as fit (`label_pt` points); without labels none (the frames of an animation, one canvas size for
    all). `panel`: inches a heatmap, by default enough for a label per token."""
    n_layer, n_head, T, _ = maps.shape
    panel = panel or 1.2 + 0.09 * T
    margins = (1.6 * colorbar, 1.2 if labels else 0.4)  # inches: the colour bar; the token labels and the title
    fig, axes = plt.subplots(n_layer, n_head, figsize=(panel * n_head + margins[0], panel * n_layer + margins[1]),
                             squeeze=False, layout="constrained")
    ticks = token_ticks(T) if panel / T >= 0.1 else token_ticks(T)[::2]
    image = None
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            image = ax.imshow(maps[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8.5)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8.5)
                if labels:
                    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=label_pt)
            if layer == n_layer - 1 and labels:
                ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=label_pt, rotation=90)
    if colorbar:
        bar = fig.colorbar(image, ax=axes, fraction=0.04, pad=0.02, shrink=min(1.0, 3 / n_layer + 0.2))
        bar.ax.tick_params(labelsize=label_pt)
        bar.set_label("attention weight", fontsize=label_pt)
    fig.suptitle(title, fontsize=9)
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
