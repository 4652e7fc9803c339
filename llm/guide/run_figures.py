"""The figures of the training and generation chapters. Each draws at the PDF's text width with no text under
LABEL_PT at A4, and returns the matplotlib figure, which the chapter saves (llm.plots.save_figure) and a test can
read back (the lines and limits as drawn)."""

import math

import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter

from llm.guide.figures import LABEL_PT, PAGE_WIDTH
from llm.plots import plt

TEXT_SIZES = {"font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": LABEL_PT,
              "ytick.labelsize": LABEL_PT, "legend.fontsize": LABEL_PT}
UNIFORM_LABEL = "uniform guess"  # the label of the loss figure's ln(vocab) line (a test finds it by this)
KEPT_COLOUR, REMOVED_COLOUR = "#4c72b0", "#c8c8c8"


def training_figure(train: tuple[list[int], list[float]], val: tuple[list[int], list[float]], vocab_size: int,
                    schedule: list[tuple[str, list[int], list[float]]], warmup_steps: int,
                    grad_norm: tuple[list[int], list[float]], grad_clip: float,
                    speed: tuple[list[int], list[float]]) -> plt.Figure:
    """The loss against tokens seen ((tokens, loss) of train and val, nats on the left axis and bits on the
    right), with the loss of a uniform guess, ln(vocab_size), across it; under it the learning rate of each
    optimizer by step (the warmup shaded), the gradient norm (the clipping threshold dashed; 0: none) and the
    speed in tokens per second."""
    with plt.rc_context(TEXT_SIZES):
        fig = plt.figure(figsize=(PAGE_WIDTH, 5.4), layout="constrained")
        grid = fig.add_gridspec(2, 3, height_ratios=[1.35, 1])
        loss = fig.add_subplot(grid[0, :])
        uniform = math.log(vocab_size)
        tokens = train[0] + val[0]
        loss.plot(*train, "-", label="train (mean of each logged interval)")
        loss.plot(*val, "o-", markersize=4, label="val (fixed held-out batches)")
        loss.plot([0, max(tokens, default=1)], [uniform, uniform], "--", color="#c00000",
                  label=f"{UNIFORM_LABEL}: ln {vocab_size:,} = {uniform:.3f}")
        lowest = min(train[1] + val[1], default=0.0)
        loss.set_ylim(max(0.0, lowest - 0.15 * (uniform - lowest)), uniform + 0.1 * (uniform - lowest))
        loss.xaxis.set_major_formatter(EngFormatter(sep=""))
        loss.set_xlabel("tokens seen")
        loss.set_ylabel("loss (nats per token)")
        loss.set_title("the loss: cross-entropy of the next token")
        bits = loss.twinx()
        bits.set_ylim(*(limit / math.log(2) for limit in loss.get_ylim()))
        bits.set_ylabel("bits per token")
        loss.legend(loc="lower left")
        lr, norm, rate = (fig.add_subplot(grid[1, column]) for column in range(3))
        # each curve named beside it: the first (AdamW's, the higher) above-right of its point at half the steps,
        # the other below-left at 40 %, so that neither name crosses a curve
        for index, (label, steps, lrs) in enumerate(schedule):
            lr.plot(steps, lrs, "-")
            at, offset, align = ((len(steps) // 2, 4, ("left", "bottom")) if index == 0 else
                                 (len(steps) * 2 // 5, -4, ("right", "top")))
            lr.annotate(label, (steps[at], lrs[at]), xytext=(offset, offset), textcoords="offset points",
                        ha=align[0], va=align[1], color=lr.lines[-1].get_color(), fontsize=LABEL_PT)
        lr.axvspan(0, warmup_steps, color="#f0c36d", alpha=0.5)
        lr.set_title("learning rate")
        norm.plot(*grad_norm, "o-", markersize=3)
        if grad_clip > 0:
            norm.axhline(grad_clip, linestyle="--", color="#c00000", label=f"clipped above {grad_clip}")
            norm.legend(loc="upper right")
        norm.set_title("gradient norm (before clipping)")
        rate.plot(*speed, "o-", markersize=3)
        rate.set_title("tokens per second")
        for ax in (loss, lr, norm, rate):
            ax.grid(alpha=0.3)
        for ax in (lr, norm, rate):
            ax.set_xlabel("step")
    return fig


def sampling_figure(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, str]],
                    labels: list[str]) -> plt.Figure:
    """The next token's probabilities as each step of sampling leaves them, one panel per step on one x and one
    y axis: (title, probability of each shown token after the step, a bool per token: removed by this step,
    its probability before the step, a note under the title). A removed token is a grey bar at the probability
    it had before. The x axis is logarithmic, so that the unlikely tokens a filter removes are seen at all."""
    rows = np.arange(len(labels))[::-1]
    drawn = np.concatenate([np.where(removed, before, after) for _, after, removed, before, _ in panels])
    floor = 10 ** math.floor(math.log10(max(float(drawn[drawn > 0].min()), 1e-12) / 2))
    columns = 2 if len(panels) > 2 else len(panels)
    lines = math.ceil(len(panels) / columns)
    with plt.rc_context(TEXT_SIZES):
        fig, axes = plt.subplots(lines, columns, figsize=(PAGE_WIDTH, 0.4 + lines * (0.9 + 0.14 * len(labels))),
                                 sharex=True, sharey=True, squeeze=False, layout="constrained")
        for ax, (title, after, removed, before, note) in zip(axes.flat, panels, strict=False):
            kept = ~removed & (after > 0)
            ax.barh(rows[kept], after[kept] - floor, left=floor, color=KEPT_COLOUR)
            ax.barh(rows[removed], before[removed] - floor, left=floor, color=REMOVED_COLOUR, hatch="///",
                    edgecolor="#909090")
            ax.set_title(f"{title}\n{note}")
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(labelleft=True)  # the tokens beside every panel: which ones are grey is read at once
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes[0][0].set_xscale("log")
        axes[0][0].set_xlim(floor, 1.0)
        axes[0][0].xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.001, not 10^-3
        axes[0][0].xaxis.set_minor_formatter(NullFormatter())
        axes[0][0].set_yticks(rows, labels)
        for ax in axes[-1]:
            ax.set_xlabel("probability (log scale)")
        fig.legend(handles=[Patch(color=KEPT_COLOUR, label="kept"),
                            Patch(facecolor=REMOVED_COLOUR, hatch="///", edgecolor="#909090",
                                  label="removed by this step (at its probability before)")],
                   loc="outside lower center", ncols=2)
    return fig
