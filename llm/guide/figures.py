"""The guide's figures (PNG, and the attention GIF). Drawn with matplotlib, like llm/plots.py, whose helpers
these reuse; each function takes plain arrays and a path."""

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import FancyBboxPatch, Rectangle
from PIL import Image

from llm.fileio import atomic_path
from llm.plots import attention_figure, plt, save_figure, token_ticks

PAGE_WIDTH = 6.8  # inches: the PDF's text width (A4 less margins); a figure this wide is set at its drawn size
MIN_HEIGHT = PAGE_WIDTH / 2.2  # inches: a figure scaled to a phone's 390 px is still 150 px tall or more
MAX_HEIGHT = 7.6  # inches: the PDF sets a figure at most 3/4 of an A4 page's text height (about 7.8 in) tall
LABEL_PT = 7.5  # the smallest text in a figure: at least 7 pt at A4 (a tight bounding box may grow a little)
TEXT_SIZES = {"font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": LABEL_PT,
              "ytick.labelsize": LABEL_PT, "legend.fontsize": LABEL_PT}


def bars(labels: list[str], values: list[float], xlabel: str, title: str, path: Path) -> None:
    """Horizontal bars, one per label, top to bottom in the order given."""
    with plt.rc_context(TEXT_SIZES):
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, max(MIN_HEIGHT, 0.8 + 0.2 * len(labels))))
        ax.barh(range(len(labels))[::-1], values, color="#4c72b0")
        ax.set_yticks(range(len(labels))[::-1], labels)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()  # long labels (file names) fit inside PAGE_WIDTH, so the PDF sets the figure at its size
        save_figure(fig, path)


def histogram(values: np.ndarray, bins: np.ndarray, xlabel: str, title: str, path: Path) -> None:
    with plt.rc_context(TEXT_SIZES):
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, MIN_HEIGHT))
        ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens in the vocabulary")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        save_figure(fig, path)


def distributions(panels: list[tuple[str, list[float]]], labels: list[str], path: Path) -> None:
    """Bar charts side by side, one per panel (title, a probability per label), sharing the labels."""
    with plt.rc_context(TEXT_SIZES):
        fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH, max(MIN_HEIGHT, 0.9 + 0.2 * len(labels))),
                                 sharey=True)
        for ax, (title, values) in zip(axes, panels, strict=True):
            ax.barh(range(len(labels))[::-1], values, color="#4c72b0")
            ax.set_title(title)
            ax.set_xlim(0, max(max(values) * 1.1, 1e-3))
            ax.set_xlabel("probability")
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(labels))[::-1], labels)
        fig.tight_layout()
        save_figure(fig, path)


def curves(panels: list[tuple[str, str, str, list[tuple[str, list[float], list[float], str]]]], path: Path,
           columns: int = 2) -> None:
    """A grid of line plots: each panel is (title, xlabel, ylabel, [(label, xs, ys, style)])."""
    rows = (len(panels) + columns - 1) // columns
    with plt.rc_context(TEXT_SIZES):
        fig, axes = plt.subplots(rows, columns, figsize=(PAGE_WIDTH, max(MIN_HEIGHT, 2.9 * rows)), squeeze=False)
        for ax, (title, xlabel, ylabel, lines) in zip(axes.flat, panels, strict=False):
            for label, xs, ys, style in lines:
                ax.plot(xs, ys, style, label=label, markersize=4)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if len(lines) > 1:
                ax.legend()
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        save_figure(fig, path)


# --- heatmaps --------------------------------------------------------------------------------------------------

HIGHLIGHT_COLOUR = "#f4a582"  # the slice of a matrix the text is about (a head)
MASKED_COLOUR = "#8c8c8c"  # a −∞ (masked) cell: grey, unlike any value of the colour maps used (white is 0)


def _heatmap(ax: plt.Axes, fig: plt.Figure, matrix: np.ndarray, cmap: str, title: str) -> None:
    """One heatmap with its colour bar; −∞ cells drawn in MASKED_COLOUR, marked −∞ where a cell has room."""
    finite = matrix[np.isfinite(matrix)]
    colours = plt.get_cmap(cmap).with_extremes(bad=MASKED_COLOUR)
    shown = np.ma.masked_invalid(matrix)
    if finite.size and not finite.any() and np.isneginf(matrix).any():  # a mask: only 0 and −∞, two colours
        image = ax.imshow(np.isfinite(matrix).astype(float), cmap=ListedColormap([MASKED_COLOUR, "white"]),
                          vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=8.5)
        bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, ticks=[0.25, 0.75])
        bar.ax.set_yticklabels(["−∞", "0"], fontsize=LABEL_PT)
        bar.outline.set_edgecolor("#999999")
        return
    if cmap == "RdBu_r":  # signed values: white at zero
        bound = float(np.abs(finite).max()) if finite.size else 0.0
        bound = bound or 1.0  # all zero (the mask's kept cells): still white at zero, on a scale of its own
        image = ax.imshow(shown, cmap=colours, vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    else:
        image = ax.imshow(shown, cmap=colours, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=8.5)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.ax.tick_params(labelsize=LABEL_PT)
    masked = np.argwhere(np.isneginf(matrix))
    if len(masked):
        cell = ax.get_window_extent().height / fig.dpi / matrix.shape[0]  # inches per row
        if cell >= 0.22:
            for row, col in masked:
                ax.text(col, row, "−∞", ha="center", va="center", fontsize=LABEL_PT, color="white")


def matrices(panels: list[tuple[str, np.ndarray, str]], row_labels: list[str], path: Path,
             col_labels: list[str] | None = None, columns: int | None = None, highlight_row: int | None = None) -> None:
    """Labelled heatmaps, each with its colour bar: (title, matrix (tokens x something), colour map), `columns`
    to a row (default: all in one row). Rows are tokens; a square matrix gets `col_labels` across, another one
    channel numbers. −∞ (a masked score) is drawn grey, apart from every finite value; `highlight_row` is framed
    in every panel."""
    T = len(row_labels)
    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    panel_width = PAGE_WIDTH / columns
    margin = 1.3 if col_labels is not None else 0.8  # inches of a panel that are not rows: title, labels below
    # The PDF shrinks a figure taller than MAX_HEIGHT, and its text with it: rows get what is left of that.
    row_inches = min(0.16 if col_labels is not None else 0.14, (MAX_HEIGHT / rows - margin) / T)
    panel_height = T * row_inches + margin
    height = max(panel_height * rows, MIN_HEIGHT)
    fig, axes = plt.subplots(rows, columns, figsize=(panel_width * columns, height), squeeze=False,
                             layout="constrained")
    ticks = token_ticks(T)
    for ax, (title, matrix, cmap) in zip(axes.flat, panels, strict=False):
        _heatmap(ax, fig, matrix, cmap, title)
        if highlight_row is not None:
            ax.add_patch(Rectangle((-0.5, highlight_row - 0.5), matrix.shape[1], 1, fill=False, edgecolor="#ff7f0e",
                                   linewidth=1.6))
        ax.set_yticks(ticks, [row_labels[i] for i in ticks], fontsize=LABEL_PT)
        if matrix.shape[1] == T and col_labels is not None:
            ax.set_xticks(ticks, [col_labels[i] for i in ticks], fontsize=LABEL_PT, rotation=90)
        else:
            ax.set_xlabel("channel of the head", fontsize=LABEL_PT)
            ax.tick_params(axis="x", labelsize=LABEL_PT)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    save_figure(fig, path)


def attention_heads(maps: np.ndarray, labels: list[str], title: str, path: Path) -> None:
    """Every head of every layer (llm.plots.attention_figure), as wide as the page allows, with its colour bar."""
    panel = min(2.2, (PAGE_WIDTH - 1.6) / maps.shape[1])
    save_figure(attention_figure(maps, labels, title, panel=panel, colorbar=True, label_pt=LABEL_PT), path)


# --- diagrams ----------------------------------------------------------------------------------------------

BOX_COLOURS = {"data": "#eeeeee", "embed": "#fde2a7", "block": "#c9e7f5", "norm": "#e0d7f5", "attention": "#f6cde0",
               "mlp": "#d6f0c8", "head": "#f9d3b8"}


def _box(ax: plt.Axes, x: float, y: float, text: str, kind: str, width: float, height: float = 0.4) -> None:
    """A rounded box centred at (x, y), in inches (the axes' units)."""
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height,
                                boxstyle="round,pad=0.02,rounding_size=0.06", facecolor=BOX_COLOURS[kind],
                                edgecolor="#555555", linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=8)


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], label: str = "",
           side: str = "right") -> None:
    """An arrow from start to end; `label` (a shape) beside its middle, to the right (or left, or above)."""
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "-|>", "color": "#333333", "linewidth": 0.9,
                                                      "shrinkA": 0, "shrinkB": 0})
    if label:
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        offset = {"right": (0.08, 0, "left", "center"), "left": (-0.08, 0, "right", "center"),
                  "above": (0, 0.06, "center", "bottom")}[side]
        ax.text(mx + offset[0], my + offset[1], label, ha=offset[2], va=offset[3], fontsize=LABEL_PT + 0.5,
                color="#1f4e79", family="monospace")


def model_diagram(flow: list[tuple[str, str, str]], expanded: int, block: list[tuple[str, str, str]],
                  stream: str, path: Path) -> None:
    """The model as boxes and arrows: `flow` top to bottom, (box text, kind, the shape on the arrow leaving it);
    the box at `expanded` (a block) drawn again on the right in detail. `block` is its two halves' four boxes,
    (text, kind, shape out): norm, attention, norm, MLP, each half's output added to the residual stream, whose
    shape is `stream`. Kinds colour the boxes (BOX_COLOURS)."""
    step = 0.72  # inches from one box to the next
    height = step * len(flow) + 0.3
    fig = plt.figure(figsize=(PAGE_WIDTH, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, PAGE_WIDTH)
    ax.set_ylim(0, height)
    ax.axis("off")
    main_x, main_width = 1.2, 2.3
    ys = [height - 0.35 - step * i for i in range(len(flow))]
    for i, ((text, kind, shape), y) in enumerate(zip(flow, ys, strict=True)):
        _box(ax, main_x, y, text, kind, main_width)
        if i + 1 < len(flow):
            _arrow(ax, (main_x, y - 0.2), (main_x, ys[i + 1] + 0.2), shape)
    # The expanded block, on the right: the residual stream down its right edge, two halves branching off it.
    left, right = 2.65, PAGE_WIDTH - 0.05
    stream_x, half_x, half_width = right - 0.45, 4.05, 2.5
    top = min(ys[expanded] + 2.0, height - 0.05)
    rows = [top - 0.6, top - 1.5, top - 2.45, top - 3.3]  # norm, attention, norm, MLP
    layer_heights = [0.72, 0.45]  # attention's box holds four lines
    bottom = rows[-1] - 0.55
    ax.add_patch(Rectangle((left, bottom), right - left, top - bottom, fill=False, linestyle="--",
                           edgecolor="#777777", linewidth=0.8))
    ax.text(left + 0.08, top - 0.08, f"{flow[expanded][0]}, in detail", ha="left", va="top", fontsize=8,
            style="italic")
    for corner in (top, bottom):
        ax.plot([main_x + main_width / 2, left], [ys[expanded], corner], linestyle=":", color="#777777",
                linewidth=0.8)
    _arrow(ax, (stream_x, top - 0.25), (stream_x, bottom + 0.1))
    ax.text(stream_x + 0.1, (top + bottom) / 2, f"residual stream {stream}", rotation=90, ha="left",
            va="center", fontsize=LABEL_PT + 0.5, color="#1f4e79", family="monospace")
    for half in range(2):
        (norm, norm_kind, norm_shape), (layer, layer_kind, layer_shape) = block[2 * half:2 * half + 2]
        y_norm, y_layer, layer_height = rows[2 * half], rows[2 * half + 1], layer_heights[half]
        _arrow(ax, (stream_x, y_norm), (half_x + half_width / 2, y_norm))
        _box(ax, half_x, y_norm, norm, norm_kind, half_width, 0.36)
        _arrow(ax, (half_x, y_norm - 0.18), (half_x, y_layer + layer_height / 2), norm_shape)
        _box(ax, half_x, y_layer, layer, layer_kind, half_width, layer_height)
        _arrow(ax, (half_x + half_width / 2, y_layer), (stream_x - 0.09, y_layer), layer_shape, side="above")
        ax.text(stream_x, y_layer, "+", ha="center", va="center", fontsize=10, fontweight="bold",
                bbox={"boxstyle": "circle,pad=0.1", "facecolor": "white", "edgecolor": "#333333"})
    save_figure(fig, path)


def shape_blocks(x: tuple[str, int, int], products: list[tuple[str, str, int, int, int | None]], path: Path) -> None:
    """x (name, rows, columns) times each weight matrix gives an output, a row of the figure each: every matrix
    a rectangle drawn to one scale, labelled with its shape. `products` are (weight name, output name, columns,
    heads, the head to highlight or None): the weight has x's columns as rows, the output x's rows; both are
    cut into `heads` slices of equal width."""
    name, T, C = x
    widest = max(columns for _, _, columns, _, _ in products)
    gap = 0.3 * max(C, widest)
    units_wide = C + 2 * widest + 2 * gap
    scale = (PAGE_WIDTH - 0.3) / units_wide  # inches per row or column of a matrix
    row_height = C + 0.55 / scale  # room under each row's matrices for two lines of labels
    units_high = len(products) * row_height
    fig = plt.figure(figsize=(PAGE_WIDTH, units_high * scale + 0.2))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.15 / scale, units_wide + 0.15 / scale)
    ax.set_ylim(-0.1 / scale, units_high + 0.1 / scale)
    ax.axis("off")

    def matrix(left: float, centre: float, rows: int, columns: int, heads: int, highlight: int | None,
               colour: str, label: str) -> None:
        bottom = centre - rows / 2
        width = columns / heads
        for head in range(heads):
            ax.add_patch(Rectangle((left + head * width, bottom), width, rows, edgecolor="#333333", linewidth=0.6,
                                   facecolor=HIGHLIGHT_COLOUR if head == highlight else colour))
        ax.text(left + columns / 2, bottom - 0.06 / scale, label, va="top", ha="center", fontsize=8)

    weight_left = C + gap
    for i, (weight, output, columns, heads, highlight) in enumerate(products):
        centre = units_high - i * row_height - C / 2 - 0.1 / scale
        cut = f"\n{heads} heads of {columns // heads}" if heads > 1 else ""
        matrix(0, centre, T, C, 1, None, "#fde2a7", f"{name}: {T} × {C}\n(tokens × channels)")
        matrix(weight_left, centre, C, columns, heads, highlight, "#c9e7f5", f"{weight}: {C} × {columns}{cut}")
        out_left = weight_left + columns + gap
        matrix(out_left, centre, T, columns, heads, highlight, "#d6f0c8", f"{output}: {T} × {columns}{cut}")
        ax.text(C + gap / 2, centre, "×", fontsize=13, ha="center", va="center")
        ax.text(weight_left + columns + gap / 2, centre, "=", fontsize=13, ha="center", va="center")
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
    with plt.rc_context(TEXT_SIZES):
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, max(MIN_HEIGHT, 1.2 + 0.55 * len(tasks))))
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
        ax.legend(loc="lower right")
        fig.tight_layout()
        save_figure(fig, path)
