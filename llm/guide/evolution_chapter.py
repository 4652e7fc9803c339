"""The chapter "Attention over training", from the attention the train stage recorded (plots/attention.safetensors):
how spread out each head's attention is (its entropy, against attention spread evenly), which heads took on a
role the record shows (the previous token, the first token, the token itself, or spreading evenly), and the
next-token loss whose gradient made those changes."""

import dataclasses
from pathlib import Path

import numpy as np

from llm.attention import AttentionRecord
from llm.configs.train import TrainConfig
from llm.guide import evolution_figures as figures
from llm.guide.document import Chapter, Exercise, Figure, Table, Text
from llm.guide.figures import attention_gif
from llm.guide.inputs import Run
from llm.guide.model_chapters import row_entropy
from llm.history import HistoryRow
from llm.tokenizer import token_label
from llm.train import is_eval_step

# A head is named for a position (the previous token, the first, itself) when, on average over its rows, it
# gives that position at least ROLE_SHARE times what even attention would, and at least ROLE_FLOOR of its weight
# (on a long text even attention's share is small, and twice a small share is no focus).
ROLE_SHARE = 2.0
ROLE_FLOOR = 0.3
SPREAD_FRACTION = 0.9  # a spreading head: no position named, entropy at least this fraction of even attention's
STEADY_BITS = 0.05  # an entropy change over the run smaller than this is "barely changes"
FILMSTRIP_FRAMES = 12  # recorded frames the filmstrip shows at most (the GIF shows them all)
PANEL_HEADS = 9  # heads shown at the first, a middle and the last step, at most
PANEL_ROWS = 4  # heads per panel figure, at most

UNQUOTABLE = "'\"$`\\!"  # a text with one of these gets no command to copy: its quoting would not read plainly
POSITION_NAMES = {"previous": "previous-token head", "first": "first-token head",
                  "current": "current-token head"}
SPREADING = "spreading head"


def even_attention(T: int) -> np.ndarray:
    """Attention spread evenly over the visible positions: row i gives 1 / (i + 1) to each of tokens 0..i, as
    one layer of one head, (1, 1, T, T)."""
    return (np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None])[None, None]


def mean_distance(maps: np.ndarray) -> np.ndarray:
    """Mean number of tokens back each query attends to, weighted by attention: (n_layer, n_head)."""
    T = maps.shape[-1]
    distance = np.arange(T)[:, None] - np.arange(T)[None, :]
    return (maps * np.clip(distance, 0, None)).sum(-1)[..., 1:].mean(-1)


def position_weights(maps: np.ndarray) -> dict[str, np.ndarray]:
    """The weight each head gives the previous token, the first token and the token itself, averaged over the
    rows from the third token on (in row 1 the previous token is the first): (n_layer, n_head) each; empty
    below three tokens."""
    T = maps.shape[-1]
    if T < 3:
        return {}
    rows = np.arange(2, T)
    return {"previous": maps[..., rows, rows - 1].mean(-1), "first": maps[..., rows, 0].mean(-1),
            "current": maps[..., rows, rows].mean(-1)}


def measures(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-head measure of one frame (n_layer, n_head, T, T): entropy (bits), distance (tokens back) and
    the position weights; each (n_layer, n_head)."""
    return {"entropy": row_entropy(maps), "distance": mean_distance(maps), **position_weights(maps)}


def even_measures(T: int) -> dict[str, float]:
    """What even attention over T tokens scores on each measure, averaged as the heads' measures are."""
    return {name: float(value[0, 0]) for name, value in measures(even_attention(T)).items()}


@dataclasses.dataclass(frozen=True)
class HeadRole:
    """What one head measurably does in one frame: its name (None: no role by these measures), and the measure
    that earned it (a weight, or for a spreading head the entropy in bits)."""

    layer: int
    head: int
    name: str | None
    value: float

    @property
    def label(self) -> str:
        return f"L{self.layer} H{self.head}"


def role_threshold(even: dict[str, float]) -> float:
    """The weight a head must give one position to be named for it (the even share is the same for the three)."""
    return max(ROLE_SHARE * even["previous"], ROLE_FLOOR)


def head_roles(frame: dict[str, np.ndarray], even: dict[str, float]) -> list[HeadRole]:
    """Each head's role in a frame's measures: the position it gives the most weight, if that clears
    role_threshold; otherwise spreading, if its entropy is within SPREAD_FRACTION of even attention's."""
    n_layer, n_head = frame["entropy"].shape
    roles = []
    for layer in range(n_layer):
        for head in range(n_head):
            weights = {position: float(frame[position][layer, head]) for position in POSITION_NAMES
                       if position in frame}
            best = max(weights, key=weights.get) if weights else None
            entropy = float(frame["entropy"][layer, head])
            if best is not None and weights[best] >= role_threshold(even):
                roles.append(HeadRole(layer, head, POSITION_NAMES[best], weights[best]))
            elif weights and entropy >= SPREAD_FRACTION * even["entropy"]:
                roles.append(HeadRole(layer, head, SPREADING, entropy))
            else:
                roles.append(HeadRole(layer, head, None, entropy))
    return roles


def bits(entropy: float) -> str:
    """An entropy for the text: never "-0.00" (a row of one weight 1 sums to -0.0)."""
    return f"{max(float(entropy), 0.0) + 0.0:.2f}"  # max(-0.0, 0.0) is -0.0; adding 0.0 makes it 0.0


def entropy_change(before: float, after: float) -> str:
    """How a head's attention changed, from the sign of its entropy change."""
    if after - before > STEADY_BITS:
        return "spreads out"
    if before - after > STEADY_BITS:
        return "sharpens"
    return "barely changes"


def shown_steps(steps: list[int]) -> list[int]:
    """Indices of the first, a middle and the last recorded step (fewer when fewer were recorded)."""
    return sorted({0, len(steps) // 2, len(steps) - 1})


def filmstrip_indices(count: int) -> list[int]:
    return sorted({round(i) for i in np.linspace(0, count - 1, min(FILMSTRIP_FRAMES, count))})


def panel_heads(roles: list[HeadRole], entropies: np.ndarray) -> list[tuple[int, int]]:
    """The heads drawn step by step: all of them when few, else the named ones first, then those whose entropy
    moved most (entropies: (frames, n_layer, n_head)), PANEL_HEADS in all, in layer order."""
    if len(roles) <= PANEL_HEADS:
        return [(r.layer, r.head) for r in roles]
    moved = np.abs(entropies[-1] - entropies[0])
    ranked = sorted(roles, key=lambda r: (r.name is None, -moved[r.layer, r.head]))
    return sorted((r.layer, r.head) for r in ranked[:PANEL_HEADS])


def recorded_steps(cfg: TrainConfig) -> list[int]:
    """The steps a run of `cfg` records attention at: step 0 and every evaluation (llm.train.is_eval_step)."""
    return [0, *(done for done in range(1, cfg.max_steps + 1) if is_eval_step(done, cfg))]


def loss_at(history: list[HistoryRow], step: int) -> float | None:
    return next((row.train_loss for row in history if row.step == step), None)


def evolution_chapter(run: Run, figure_dir: Path) -> Chapter:
    record = run.record
    labels = [token_label(run.tokenizer, i) for i in record.ids]
    frames = [measures(maps) for maps in record.maps]
    even = even_measures(len(record.ids))
    entropies = np.stack([f["entropy"] for f in frames])  # (frames, n_layer, n_head)
    final_roles = head_roles(frames[-1], even)
    draw_figures(run, figure_dir, frames, even, final_roles, labels)
    blocks = [*recording_blocks(run), *entropy_blocks(run, frames, even), *role_blocks(record, frames, even,
                                                                                           final_roles),
              *panel_blocks(record, final_roles, entropies), *exercises(run, final_roles)]
    return Chapter("attention-over-training", "Attention over training", blocks)


def head_label(layer: int, head: int) -> str:
    return f"L{layer} H{head}"


def draw_figures(run: Run, figure_dir: Path, frames: list[dict[str, np.ndarray]], even: dict[str, float],
                 roles: list[HeadRole], labels: list[str]) -> None:
    record = run.record
    steps = record.steps
    heads = [(r.layer, r.head) for r in roles]
    film = [(f"step {steps[i]:,}", record.maps[i]) for i in filmstrip_indices(len(steps))]
    figures.filmstrip(film, figure_dir / "attention_filmstrip.png")
    attention_gif([(f"step {s:,}", m) for s, m in zip(steps, record.maps, strict=True)], labels,
                  figure_dir.parent / "attention_evolution.gif")
    loss = [("train loss", [r.step for r in run.history], [r.train_loss for r in run.history])]
    evaluated = [r for r in run.history if r.val_loss is not None]
    if evaluated:
        loss.append(("val loss", [r.step for r in evaluated], [r.val_loss for r in evaluated]))
    figures.loss_and_entropy(loss, steps, [(head_label(*h), [f["entropy"][h] for f in frames]) for h in heads],
                             even["entropy"], figure_dir / "attention_curves.png")
    panels = [(title, unit, {head_label(*h): [f[name][h] for f in frames] for h in heads}, even[name])
              for name, title, unit in (("previous", "weight on the previous token", "weight"),
                                        ("first", "weight on the first token", "weight"),
                                        ("current", "weight on the token itself", "weight"),
                                        ("distance", "mean distance attended", "tokens back"))
              if name in even]
    figures.role_curves(steps, panels, figure_dir / "attention_roles.png")
    names = {(r.layer, r.head): r.name for r in roles}
    chosen = panel_heads(roles, np.stack([f["entropy"] for f in frames]))
    picked = shown_steps(steps)
    for number, group in enumerate(panel_groups(chosen), 1):
        rows = [(head_label(*h) + (f": {names[h]}" if names[h] else ""), [record.maps[i][h] for i in picked])
                for h in group]
        figures.head_panels(rows, [f"step {steps[i]:,}" for i in picked], labels,
                            figure_dir / f"attention_heads_{number}.png")


def panel_groups(heads: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """The heads drawn step by step, a figure per layer (PANEL_ROWS heads at most each)."""
    groups: list[list[tuple[int, int]]] = []
    for layer in sorted({layer for layer, _ in heads}):
        of_layer = [h for h in heads if h[0] == layer]
        groups += [of_layer[i:i + PANEL_ROWS] for i in range(0, len(of_layer), PANEL_ROWS)]
    return groups


# --- the text ----------------------------------------------------------------------------------------------

def recording_blocks(run: Run) -> list:
    record = run.record
    shown = filmstrip_indices(len(record.steps))
    return [
        Text(f"The train stage recorded every head's attention on `evaluate.attention_text` "
             f"({run.record_text!r}) at step 0 and at every evaluation (every `train.eval_interval` = "
             f"{run.settings.train.eval_interval} steps and at the end): {len(record.steps)} frames, at steps "
             f"{', '.join(f'{s:,}' for s in record.steps)}. The record is kept in each checkpoint, so a resumed run "
             "has the same frames as one that was never stopped."),
        Figure("figures/attention_filmstrip.png",
               f"The recorded frames in order ({len(shown)} of {len(record.steps)}), each every head of every layer: "
               "rows of small squares are layers, columns heads; in each square the rows are the tokens attending "
               "and the columns the tokens attended to."),
        Figure("attention_evolution.gif", "The same frames as an animation (attention_evolution.gif), one frame per "
                                          "recorded step."),
    ]


def entropy_blocks(run: Run, frames: list[dict[str, np.ndarray]], even: dict[str, float]) -> list:
    record, cfg = run.record, run.model.config
    T = len(record.ids)
    start = frames[0]["entropy"]
    mean_entropy = [float(f["entropy"].mean()) for f in frames]
    blocks: list = [
        Text("To follow a head over training we need one number for how spread out its attention is: the entropy "
             "of a row of weights, -sum(w log2 w) over the tokens the row can see, which is 0 bits when all the "
             "weight is on one token and log2(n) bits when it is spread evenly over n tokens. A head's curve is "
             "the mean entropy of its rows from the second token on (the first token can only attend to itself). "
             f"The dashed line is even attention, every row spread evenly over the tokens it can see, averaged "
             f"the same way: {even['entropy']:.2f} bits for these {T} tokens. Below the line a head is "
             "concentrating its weight; the further below, the fewer tokens it reads."),
        Text(f"At step 0 the heads are at {start.min():.2f} to {start.max():.2f} bits: "
             + ("close to even, since the random initial queries and keys give small, similar scores."
                if start.min() >= 0.9 * even["entropy"] else
                "already less than even, since the random initial scores are not small"
                + (" (QK-norm gives every query and key the same size from the start)" if cfg.qk_norm else "")
                + ", so each row puts more weight on a few tokens by chance.")),
        Text(why_attention_changes(run, mean_entropy)),
        Figure("figures/attention_curves.png",
               "Top: the training loss (and the validation loss at each evaluation) from plots/train.csv; dotted "
               "lines mark the recorded steps. Bottom: the entropy of each head's attention rows (L layer, H head) "
               "at those steps, and the even-attention line."),
    ]
    return blocks


def why_attention_changes(run: Run, mean_entropy: list[float]) -> str:
    """Why attention moves at all, with this run's loss and entropy over the first recorded interval."""
    steps = run.record.steps
    text = ("Why does attention change? Nothing in training aims at attention: the only objective is the "
            "next-token loss (the training chapter). At each step its gradient flows back through every head to "
            "W_q and W_k, the matrices that make the queries and keys, and the optimizer moves them in the "
            "direction that lowers the loss. A head's scores, and so its weights, change only where attending "
            "differently predicts the next token better, and they move less as the learning rate decays and the loss "
            "flattens.")
    first_row, last_row = (run.history[0], run.history[-1]) if run.history else (None, None)
    at_second = loss_at(run.history, steps[1]) if len(steps) > 2 else None
    if first_row is None or at_second is None:
        return text
    return text + (
        f" In this run the training loss went from {first_row.train_loss:.2f} (step {first_row.step:,}) to "
        f"{at_second:.2f} by step {steps[1]:,}, the first recorded step after 0, and {last_row.train_loss:.2f} at "
        f"the end; over the same steps the heads' mean entropy went from {mean_entropy[0]:.2f} to "
        f"{mean_entropy[1]:.2f} bits, and ended at {mean_entropy[-1]:.2f}.")


def role_blocks(record: AttentionRecord, frames: list[dict[str, np.ndarray]], even: dict[str, float],
                roles: list[HeadRole]) -> list:
    if "previous" not in even:
        return [Text(f"The recorded text is {len(record.ids)} tokens: too short to tell the previous token from "
                     "the first, so no head is named here.")]
    threshold, last = role_threshold(even), record.steps[-1]
    named = [r for r in roles if r.name]
    rows = []
    for r in roles:
        h = (r.layer, r.head)
        before, after = float(frames[0]["entropy"][h]), float(frames[-1]["entropy"][h])
        rows.append((r.label, r.name or "no single pattern", *(f"{frames[-1][p][h]:.2f}" for p in POSITION_NAMES),
                     f"{bits(before)} -> {bits(after)}", entropy_change(before, after)))
    return [
        Text("A head can be named by what it measurably does. Averaged over the rows from the third token on (so "
             "that the token before and the first token are different tokens), we call a head a previous-token "
             f"head when it puts at least {threshold:.2f} of its weight on the token just before, a first-token "
             "head when it puts that much on the first token (`<|endoftext|>`, where every training document "
             "starts: a place to park attention a row does not need), and a current-token head when it puts that "
             "much on the token itself. "
             + (f"{threshold:.2f} is twice the share even attention gives a single token here "
                f"({even['previous']:.2f}); the threshold is never under {ROLE_FLOOR}. "
                if ROLE_SHARE * even["previous"] >= ROLE_FLOOR else
                f"Even attention gives a single token {even['previous']:.2f} here, and twice that is too little to "
                f"call a focus, so the threshold is its floor, {ROLE_FLOOR:.2f}. ")
             + "A head that is none of these but "
             f"whose entropy is at least {SPREAD_FRACTION:.0%} of even attention's "
             f"({SPREAD_FRACTION * even['entropy']:.2f} bits) is a spreading head: it averages over everything "
             "before it."),
        Text(f"At step {last:,}, the last recorded, " + (f"the record shows {named_heads(named)}" if named else
                                                        "no head clears these thresholds yet")
             + (f"; the other {len(roles) - len(named)} show no single pattern by these measures."
                if named and len(named) < len(roles) else ".")
             + " The table gives every head's measures, and how its entropy moved over training."),
        Table(("head", f"at step {last:,}", "weight on previous", "on first", "on itself",
               f"entropy (bits), step {record.steps[0]:,} -> {last:,}", "over training"), rows),
        Figure("figures/attention_roles.png", "The measures that name a head, at each recorded step: the weight "
                                              "on the previous token, on the first token and on the token itself, "
                                              "and the mean distance attended, with what even attention gives."),
        Text(change_sentence(roles, frames)),
    ]


def named_heads(named: list[HeadRole]) -> str:
    """'2 previous-token heads (L0 H1, L1 H0), 1 first-token head (L0 H0) and ...', kinds in a fixed order."""
    kinds = [(name, [r.label for r in named if r.name == name])
             for name in [*POSITION_NAMES.values(), SPREADING]]
    parts = [f"{len(heads)} {name}{'s' if len(heads) > 1 else ''} ({', '.join(heads)})" for name, heads in kinds
             if heads]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def change_sentence(roles: list[HeadRole], frames: list[dict[str, np.ndarray]]) -> str:
    """The heads grouped by how their entropy moved from the first recorded step to the last."""
    groups: dict[str, list[str]] = {"sharpens": [], "spreads out": [], "barely changes": []}
    for r in roles:
        before, after = (float(f["entropy"][r.layer, r.head]) for f in (frames[0], frames[-1]))
        groups[entropy_change(before, after)].append(f"{r.label} ({bits(before)} -> {bits(after)} bits)")
    parts = []
    for word, heads in groups.items():
        if heads:
            verb = word if len(heads) == 1 else {"sharpens": "sharpen", "spreads out": "spread out",
                                                  "barely changes": "barely change"}[word]
            parts.append(f"{', '.join(heads)} {verb}")
    return ("Read against the curves, from the first recorded step to the last: " + "; ".join(parts)
            + f". A head sharpens when its entropy falls (by more than {STEADY_BITS} bits) and spreads out when it "
              "rises.")


def panel_blocks(record: AttentionRecord, roles: list[HeadRole], entropies: np.ndarray) -> list:
    chosen = panel_heads(roles, entropies)
    picked = [record.steps[i] for i in shown_steps(record.steps)]
    which = (f"all {len(chosen)} heads" if len(chosen) == len(roles) else
             f"{len(chosen)} of the {len(roles)} heads (the named ones first, then those whose entropy moved most)")
    looks = {POSITION_NAMES["previous"]: "a bright line just below the diagonal",
             POSITION_NAMES["first"]: "a bright first column", POSITION_NAMES["current"]: "a bright diagonal",
             SPREADING: "rows of one even, dim colour"}
    kinds = {name: [r for r in roles if r.name == name] for name in looks}
    # the clearest head of each kind: its largest weight on its position (for a spreading head, entropy)
    examples = "; ".join(f"{best.label}, {'the clearest' if len(heads) > 1 else 'the'} {name}, draws {looks[name]}"
                         for name, heads in kinds.items() if heads
                         for best in [max(heads, key=lambda r: r.value)])
    blocks: list = [Text(
        f"Each head at steps {', '.join(f'{s:,}' for s in picked[:-1])} and {picked[-1]:,}: the first, a middle "
        f"and the last recorded step, {which}. In each square a row is a token attending (a query) and a column a "
        "token attended to (a key); the colour is the weight, 0 to 1, and each row sums to 1. "
        + (f"Look for the names in the last column: {examples}." if examples else ""))]
    for number, group in enumerate(panel_groups(chosen), 1):
        heads = ", ".join(head_label(*h) for h in group)
        blocks.append(Figure(f"figures/attention_heads_{number}.png",
                             f"{heads} at steps {', '.join(f'{s:,}' for s in picked)}, with the tokens on both axes."))
    return blocks


def exercises(run: Run, roles: list[HeadRole]) -> list:
    """Another random start, recorded more often; the same training measured on another text."""
    train = run.settings.train
    interval = max(1, train.eval_interval // 4)
    seed = train.seed + 1
    more = recorded_steps(dataclasses.replace(train, eval_interval=interval))
    kinds = sorted({r.name for r in roles if r.name})
    # A new seed makes it a new run: with eval_interval alone, the train stage would resume the finished
    # checkpoint (eval_interval does not shape training) and record nothing new.
    blocks: list = [Exercise(
        command=f"dvc exp run -S train.seed={seed} -S train.eval_interval={interval}",
        look="the table of named heads, the curves and the filmstrip of this chapter, in the guide the run rebuilds",
        expect=f"{len(more)} recorded frames instead of {len(run.record.steps)}, from other random initial weights. "
               "The names may land on other heads, since which head takes which role depends on where it started, "
               + (f"but the kinds named here ({', '.join(k + 's' for k in kinds)}) are likely to appear again: "
                  "they are what this data and this model size make useful. " if kinds else "")
               + "The extra frames show when each head found its pattern, and whether that was while the loss "
                 "fell fastest.",
        overrides=(("train.seed", str(seed)), ("train.eval_interval", str(interval))))]
    twice = f"{run.record_text} {run.record_text}"
    if not set(twice) & set(UNQUOTABLE):
        blocks.append(Exercise(
            # quoted for Hydra (dvc's -S reads a comma as a sweep), inside double quotes for the shell
            command=f"dvc exp run -S \"evaluate.attention_text='{twice}'\"",
            look="the table of named heads and the panels of this chapter, now on the text written twice",
            expect="the previous-token and first-token heads named here keep most of their weight on the previous "
                   "and the first token: a head's role is in its W_q and W_k, not in one sentence. In the second "
                   "copy, look for a head that attends to the token just after the same token in the first copy "
                   "(an induction head, which larger models learn and tiny ones rarely do).",
            overrides=(("evaluate.attention_text", twice),)))
    return blocks
