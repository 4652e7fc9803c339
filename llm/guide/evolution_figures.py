"""The figures of the chapter on attention over training: the loss beside the heads' entropy, the measures that
name a head, each head at a few recorded steps, and a filmstrip of every recorded frame (the GIF, printable).
Each function takes plain arrays and a path; widths stay within an A4 page's text (about 6.8 inches), so text
drawn at 7 pt stays 7 pt in the PDF."""

import math
from pathlib import Path

import numpy as np

from llm.plots import plt, save_figure

WIDTH = 6.6  # inches: the PDF shows a figure at its own size up to the page's text width
EVEN_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}


LEGEND_HEADS = 12  # beyond this many heads, lines are coloured by depth instead of named one by one


def head_lines(ax, steps: list[int], lines: list[tuple[str, list[float]]]) -> None:
    """One line per head (label, value per recorded step), in layer order: named in the legend when few; when
    many, coloured from the first layer (dark) to the last (light), the legend naming only those two."""
    few = len(lines) <= LEGEND_HEADS
    cmap = plt.get_cmap("tab10" if few and len(lines) <= 10 else "viridis")
    for i, (label, values) in enumerate(lines):
        colour = cmap(i) if few and len(lines) <= 10 else cmap(i / max(len(lines) - 1, 1))
        shown = few or i in (0, len(lines) - 1)
        ax.plot(steps, values, "o-" if few else "-", color=colour, markersize=3, linewidth=1.5 if few else 0.8,
                label=label if shown else None)


def loss_and_entropy(loss: list[tuple[str, list[int], list[float]]], recorded: list[int],
                     entropy: list[tuple[str, list[float]]], even: float, path: Path) -> None:
    """Two panels on one step axis: the loss curves (label, steps, nats) with the recorded steps marked, and each
    head's entropy (label, bits at each recorded step) with the even-attention line."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(WIDTH, 6.2), sharex=True)
    for label, steps, values in loss:
        top.plot(steps, values, "o-" if len(steps) <= 20 else "-", label=label, markersize=3)
    for step in recorded:
        top.axvline(step, color="grey", linestyle=":", linewidth=0.8)
    top.set_ylabel("loss (nats per token)")
    top.set_title("the next-token loss (dotted: the steps attention was recorded at)", fontsize=9)
    top.legend(fontsize=7)
    head_lines(bottom, recorded, entropy)
    bottom.axhline(even, label="even attention", **EVEN_STYLE)
    bottom.set_ylabel("entropy (bits)")
    bottom.set_xlabel("step")
    bottom.set_title("entropy of each head's attention rows", fontsize=9)
    bottom.legend(fontsize=7, ncol=4)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def role_curves(recorded: list[int], panels: list[tuple[str, str, dict[str, list[float]], float]],
                path: Path) -> None:
    """A 2 x 2 grid of measures over training: (title, y label, {head label: value per recorded step}, the value
    of even attention); one legend for the heads below."""
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH, 5.6), sharex=True, squeeze=False)
    for ax, (title, ylabel, lines, even) in zip(axes.flat, panels, strict=False):
        head_lines(ax, recorded, list(lines.items()))
        ax.axhline(even, label="even attention", **EVEN_STYLE)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7)
    save_figure(fig, path)


def tick_stride(count: int, inches: float, points: float = 9.0) -> int:
    """Label every n-th token so that labels on an axis `inches` long are at least `points` apart."""
    return max(1, math.ceil(count * points / (inches * 72)))


def head_panels(rows: list[tuple[str, list[np.ndarray]]], steps: list[str], labels: list[str], path: Path) -> None:
    """One row per head (its name, then its (T, T) attention at each of `steps`, one column each), with the tokens
    on both axes (rows: the token attending, columns: the token attended to) and one colour bar for the weight."""
    size = 1.75
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(WIDTH, 1.3 + (size + 0.25) * len(rows)),
                             squeeze=False)
    ticks = list(range(0, len(labels), tick_stride(len(labels), size)))
    tick_labels = [labels[i] for i in ticks]
    image = None
    for r, (name, maps) in enumerate(rows):
        for c, weights in enumerate(maps):
            ax = axes[r][c]
            image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
            if r == 0:
                ax.set_title(steps[c], fontsize=8)
            ax.set_xticks(ticks, tick_labels if r == len(rows) - 1 else [], fontsize=7, rotation=90)
            ax.set_yticks(ticks, tick_labels if c == 0 else [], fontsize=7)
        axes[r][0].set_ylabel(name.replace(": ", "\n"), fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    bar = fig.colorbar(image, cax=fig.add_axes((0.9, 0.3, 0.02, 0.4)))
    bar.set_label("attention weight", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    save_figure(fig, path)


def mosaic(maps: np.ndarray) -> np.ndarray:
    """Every head of a frame (n_layer, n_head, T, T) as one array: layers as rows, heads as columns, a blank
    (NaN) line between them."""
    n_layer, n_head, T, _ = maps.shape
    out = np.full((n_layer * (T + 1) - 1, n_head * (T + 1) - 1), np.nan)
    for layer in range(n_layer):
        for head in range(n_head):
            out[layer * (T + 1):layer * (T + 1) + T, head * (T + 1):head * (T + 1) + T] = maps[layer, head]
    return out


def filmstrip(frames: list[tuple[str, np.ndarray]], path: Path) -> None:
    """The recorded frames side by side in reading order, each every head of every layer (as one frame of the
    GIF), one colour bar for all."""
    columns = min(len(frames), 3 if len(frames) <= 6 else 4)
    rows = math.ceil(len(frames) / columns)
    cell = (WIDTH - 0.6) / columns
    fig, axes = plt.subplots(rows, columns, figsize=(WIDTH, 0.3 + (cell + 0.3) * rows), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # the gaps between heads
    image = None
    for ax, (title, maps) in zip(axes.flat, frames, strict=False):
        image = ax.imshow(mosaic(maps), cmap=cmap, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(frames):]:
        ax.axis("off")
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    bar.set_label("attention weight", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    save_figure(fig, path)
