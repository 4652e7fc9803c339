"""The guide's figures (PNG, and the attention GIF). Drawn with matplotlib, like llm/plots.py, whose helpers
these reuse; each function takes plain arrays and a path."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from llm.fileio import atomic_path
from llm.plots import attention_figure, plt, save_figure


def bars(labels: list[str], values: list[float], xlabel: str, title: str, path: Path) -> None:
    """Horizontal bars, one per label, top to bottom in the order given."""
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.22 * len(labels)))
    ax.barh(range(len(labels))[::-1], values, color="#4c72b0")
    ax.set_yticks(range(len(labels))[::-1], labels, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def histogram(values: np.ndarray, bins: np.ndarray, xlabel: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens in the vocabulary")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def distributions(panels: list[tuple[str, list[float]]], labels: list[str], path: Path) -> None:
    """Bar charts side by side, one per panel (title, a probability per label), sharing the labels."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.9 + 0.25 * len(labels)), sharey=True)
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.barh(range(len(labels))[::-1], values, color="#4c72b0")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, max(max(values) * 1.1, 1e-3))
        ax.set_xlabel("probability", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels))[::-1], labels, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def curves(panels: list[tuple[str, str, str, list[tuple[str, list[float], list[float], str]]]], path: Path,
           columns: int = 2) -> None:
    """A grid of line plots: each panel is (title, xlabel, ylabel, [(label, xs, ys, style)])."""
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for ax, (title, xlabel, ylabel, lines) in zip(axes.flat, panels, strict=False):
        for label, xs, ys, style in lines:
            ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def matrices(panels: list[tuple[str, np.ndarray, str]], row_labels: list[str], path: Path,
             col_labels: list[str] | None = None) -> None:
    """Labelled heatmaps side by side: (title, matrix (tokens x something), colour map). Rows are tokens."""
    T = len(row_labels)
    height = 1.5 + 0.16 * T
    widths = [max(2.2, 0.16 * m.shape[1] + 1.2) for _, m, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), height), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (title, matrix, cmap) in zip(axes[0], panels, strict=True):
        finite = matrix[np.isfinite(matrix)]
        if cmap == "RdBu_r":  # signed values: white at zero
            bound = float(np.abs(finite).max()) if finite.size else 1.0
            image = ax.imshow(matrix, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto")
        else:
            image = ax.imshow(matrix, cmap=cmap, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(T), row_labels, fontsize=6)
        if matrix.shape[1] == T and col_labels is not None:
            ax.set_xticks(range(T), col_labels, fontsize=6, rotation=90)
        else:
            ax.set_xlabel("channel of the head", fontsize=7)
            ax.tick_params(axis="x", labelsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def labels_text(labels: list[str], limit: int = 60) -> str:
    """The tokens as one line of text, cut to `limit` characters."""
    text = "".join(labels)
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def attention_gif(frames: list[tuple[str, np.ndarray]], labels: list[str], path: Path,
                  milliseconds: int = 700) -> None:
    """One frame per recorded step: every head of every layer (rows layers, columns heads), as the GIF
    reports/guide/attention_evolution.gif. The frames share one size."""
    images = []
    for title, maps in frames:
        fig = attention_figure(maps, None, f"{title}: {labels_text(labels)}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)  # a fixed canvas, not "tight": every frame the same size
        plt.close(fig)
        images.append(Image.open(io.BytesIO(buffer.getvalue())).convert("P", palette=Image.Palette.ADAPTIVE))
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=milliseconds, loop=0)


def accuracy_bars(tasks: list[str], before: list[float | None], after: list[float], chance: list[float],
                  path: Path) -> None:
    """Per task (top to bottom), the accuracy before (None: not scored) and after, and the chance level as a mark
    across each task's pair of bars."""
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.55 * len(tasks)))
    rows = np.arange(len(tasks))[::-1]
    ax.barh(rows + 0.2, [0.0 if b is None else b for b in before], height=0.38, color="#c0c0c0",
            label="base model (few-shot)")
    ax.barh(rows - 0.2, after, height=0.38, color="#4c72b0", label="tuned model (zero-shot)")
    for row, level in zip(rows, chance, strict=True):
        ax.plot([level, level], [row - 0.45, row + 0.45], color="#c00000", linewidth=2)
    ax.plot([], [], color="#c00000", linewidth=2, label="chance")
    ax.set_yticks(rows, tasks, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy on the held-out questions")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
