"""Chapter 6: attention over training, from the attention the train stage recorded."""

from pathlib import Path

import numpy as np

from llm.guide import figures
from llm.guide.document import Chapter, Figure, Text
from llm.guide.inputs import Run
from llm.guide.model_chapters import row_entropy
from llm.plots import plot_attention_evolution
from llm.tokenizer import token_label

GRID_ROWS = 10  # recorded steps shown in the evolution grid (the GIF shows them all)


def mean_distance(maps: np.ndarray) -> np.ndarray:
    """Mean number of tokens back each query attends to, weighted by attention: (n_layer, n_head)."""
    T = maps.shape[-1]
    distance = np.arange(T)[:, None] - np.arange(T)[None, :]
    return (maps * np.clip(distance, 0, None)).sum(-1)[..., 1:].mean(-1)


def evolution_chapter(run: Run, figure_dir: Path) -> Chapter:
    record, cfg = run.record, run.model.config
    labels = [token_label(run.tokenizer, i) for i in record.ids]
    frames = [(f"step {step:,}", maps) for step, maps in zip(record.steps, record.maps, strict=True)]
    shown = sorted({round(i) for i in np.linspace(0, len(frames) - 1, min(GRID_ROWS, len(frames)))})
    plot_attention_evolution([frames[i] for i in shown], figure_dir / "attention_grid.png")
    figures.attention_gif(frames, labels, figure_dir.parent / "attention_evolution.gif")
    entropies = np.stack([row_entropy(m) for m in record.maps])  # (frames, n_layer, n_head)
    distances = np.stack([mean_distance(m) for m in record.maps])
    n_layer, n_head = entropies.shape[1:]
    heads = [(layer, head) for layer in range(n_layer) for head in range(n_head)]
    figures.curves([("entropy of the attention rows", "step", "bits",
                     [(f"L{li} H{h}", record.steps, entropies[:, li, h].tolist(), "o-") for li, h in heads]),
                    ("mean distance attended", "step", "tokens back",
                     [(f"L{li} H{h}", record.steps, distances[:, li, h].tolist(), "o-") for li, h in heads])],
                   figure_dir / "attention_curves.png")
    uniform = float(np.mean(np.log2(np.arange(2, len(record.ids) + 1))))
    sharpest = np.unravel_index(entropies[-1].argmin(), entropies[-1].shape)
    blocks: list = [
        Text(f"The train stage recorded every head's attention on `evaluate.attention_text` "
             f"({run.record_text!r}) at step 0 and at every evaluation (every `train.eval_interval` = "
             f"{run.settings.train.eval_interval} steps and at the end): {len(frames)} frames, at steps "
             f"{', '.join(f'{s:,}' for s in record.steps)}. The record is kept in each checkpoint, so a resumed run "
             "has the same frames as one that was never stopped."),
        Figure("attention_evolution.gif", "attention_evolution.gif: every head of every layer, one frame per "
                                          "recorded step."),
        Figure("figures/attention_grid.png", "Attention averaged over each layer's heads, one row per recorded "
                                             f"step ({len(shown)} of {len(frames)} shown)."),
        Text(f"A head that spread its attention evenly over the past would have rows of {uniform:.2f} bits of "
             f"entropy on average for this text. At step 0 the heads are at {entropies[0].min():.2f} to "
             f"{entropies[0].max():.2f} bits: "
             + ("close to even, since the random initial queries and keys give small, similar scores. "
                if entropies[0].min() >= 0.9 * uniform else
                "already less than even, since the random initial scores are not small"
                + (" (QK-norm gives every query and key the same size from the start)" if cfg.qk_norm else "")
                + ", so each row puts more weight on a few tokens by chance. ")
             + f"As the model learns, heads sharpen onto the tokens that help: at step {record.steps[-1]:,} the "
             f"most focused head, layer "
             f"{sharpest[0]} head {sharpest[1]}, is at {entropies[-1][sharpest]:.2f} bits and attends on average "
             f"{distances[-1][sharpest]:.1f} tokens back."),
        Figure("figures/attention_curves.png", "Per head (L layer, H head): the mean entropy of its attention rows "
                                               "and the mean distance it attends, over training."),
    ]
    return Chapter("attention-over-training", "Attention over training", blocks)
