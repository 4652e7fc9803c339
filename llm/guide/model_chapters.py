"""Chapters 4-5: the model and attention step by step."""

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm.attention import probe_ids
from llm.guide import figures
from llm.guide.document import Aside, Chapter, Exercise, Figure, Table, Text
from llm.guide.inputs import Run
from llm.model import FLOPS_PER_WEIGHT, GPT, INIT_STD, GPTConfig
from llm.tokenizer import token_label

QKV_CHANNELS = 64  # channels of Q, K and V drawn at most: beyond that a heatmap's columns are too thin to read


def attention_ids(run: Run) -> list[int]:
    return probe_ids(run.tokenizer, run.settings.evaluate.attention_text, run.eot_id, run.model.config.block_size)


# --- 4. the model ------------------------------------------------------------------------------------------

def component_of(parameter: str) -> str:
    """The component a parameter belongs to: norms (wherever they sit), attention, mlp, or its top-level module
    (wte, wpe, lm_head)."""
    if ".ln_" in parameter or parameter.startswith("ln_f") or "_norm" in parameter:
        return "norms"
    for part in ("attn", "mlp"):
        if f".{part}." in parameter:
            return "attention" if part == "attn" else "mlp"
    return parameter.split(".")[0]


def component_table(model: GPT) -> list[tuple[str, str, int, int]]:
    """(component, what it does, parameters, training FLOPs per token) for each part of the model. The FLOPs
    are model.flops_per_token() split by where they are spent, so they add up to it."""
    cfg = model.config
    params: dict[str, int] = {}
    for name, p in model.named_parameters():  # a tied head is counted once, with the embedding
        params[component_of(name)] = params.get(component_of(name), 0) + p.numel()

    def matmul_flops(prefix: str) -> int:
        return FLOPS_PER_WEIGHT * sum(m.weight.numel() for name, m in model.named_modules()
                                      if isinstance(m, torch.nn.Linear) and prefix in name)

    scores = cfg.attention_flops_per_token
    rows = [("token embedding", f"a vector of {cfg.n_embd} for each of the {cfg.vocab_size:,} ids",
             params.get("wte", 0), 0)]
    if cfg.positions == "learned":
        rows.append(("positions (learned)", f"a vector for each of the {cfg.block_size} positions, added",
                     params.get("wpe", 0), 0))
    else:
        rows.append(("positions (RoPE)", "queries and keys rotated by an angle that grows with position", 0, 0))
    if cfg.token_shift:
        rows.append(("token shift", f"a {cfg.n_embd} × {cfg.n_embd} map of the previous token's embedding, added",
                     params.get("token_shift", 0), matmul_flops("token_shift")))
    rows += [
        (f"attention x {cfg.n_layer}", f"{cfg.n_head} heads of {cfg.head_dim}: each position reads earlier ones",
         params.get("attention", 0), matmul_flops(".attn.")),
        ("attention scores", f"QK^T and the weighted sum of V over the {cfg.block_size}-token context", 0, scores),
        (f"MLP x {cfg.n_layer}", f"{cfg.n_embd} -> {cfg.mlp_hidden} ({cfg.mlp}) -> {cfg.n_embd}, per position",
         params.get("mlp", 0), matmul_flops(".mlp.")),
        ("norms", f"{cfg.norm}{' with gains' if cfg.norm_gain else ', no gains'}"
                  f"{', and on queries and keys' if cfg.qk_norm else ''}", params.get("norms", 0), 0),
        (f"head ({cfg.head})", f"{cfg.n_embd} -> {cfg.vocab_size:,} logits"
                               f"{'; shares the embedding matrix' if cfg.head == 'tied' else ''}",
         params.get("lm_head", 0), matmul_flops("lm_head")),
    ]
    return rows


@torch.no_grad()
def activation_shapes(model: GPT, ids: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(where, shape) of the activations of one forward pass over `ids`, taken by hooks on the real modules."""
    seen: list[tuple[str, tuple[int, ...]]] = [("input ids", (1, len(ids)))]
    hooks = []

    def watch(name: str, module: torch.nn.Module) -> None:
        hooks.append(module.register_forward_hook(lambda _m, _i, out: seen.append((name, tuple(out.shape)))))

    watch("token embedding", model.wte)
    first = model.blocks[0]
    watch("block 0: norm", first.ln_1)
    watch("block 0: q, k, v together", first.attn.c_attn)
    watch("block 0: attention out", first.attn)
    hidden = first.mlp.c_fc if hasattr(first.mlp, "c_fc") else first.mlp.up
    watch("block 0: MLP hidden", hidden)
    watch("block 0: MLP out", first.mlp)
    for i, block in enumerate(model.blocks):
        watch(f"block {i} out (residual stream)", block)
    watch("final norm", model.ln_f)
    watch("logits", model.lm_head)
    try:
        model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    cfg = model.config
    T = len(ids)
    at = next(i for i, (name, _) in enumerate(seen) if name == "block 0: attention out")
    seen[at:at] = [("block 0: q per head", (1, cfg.n_head, T, cfg.head_dim)),
                   ("block 0: k, v per head", (1, cfg.n_kv_head, T, cfg.head_dim)),
                   ("block 0: attention weights", (1, cfg.n_head, T, T))]
    return seen


def weight_stds(model: GPT) -> dict[str, list[float]]:
    """Standard deviation of each block's matrices, by depth."""
    stds: dict[str, list[float]] = {}
    for block in model.blocks:
        mlp = block.mlp
        parts = {"attention q,k,v": block.attn.c_attn, "attention out": block.attn.c_proj,
                 "MLP in": getattr(mlp, "c_fc", None) or getattr(mlp, "up", None),
                 "MLP out": getattr(mlp, "c_proj", None) or getattr(mlp, "down", None)}
        for name, module in parts.items():
            stds.setdefault(name, []).append(float(module.weight.detach().float().std()))
    return stds


def shape_text(shape: tuple[int, ...]) -> str:
    return " × ".join(f"{n:,}" for n in shape)


def modern_parts(cfg: GPTConfig) -> list[tuple[str, str]]:
    """(name, what it does) for each part of the config that GPT-2 (2019) did not have and later recipes added;
    empty for the gpt2 preset. Positions and the norm are in the main text: every model has one of each."""
    parts = []
    if cfg.qk_norm:
        parts.append(("QK-norm", "each head's queries and keys are RMS-normalised before their dot product, so a "
                                 "score cannot grow without bound as training sharpens attention, and the "
                                 "softmax keeps passing gradients."))
    if cfg.mlp == "relu2":
        parts.append(("ReLU²", "the MLP's nonlinearity is the squared ReLU, max(0, x)²: zero for a negative input, "
                               "growing quadratically above; cheaper than GELU, and it trained faster in the "
                               "small-model speedruns (modded-nanogpt) this preset follows."))
    if cfg.mlp == "swiglu":
        parts.append(("SwiGLU", f"the MLP has two input matrices; one goes through SiLU and multiplies the other "
                                f"number by number (a gate), then a third matrix narrows back. Its hidden width, "
                                f"{cfg.mlp_hidden}, is 8/3 of {cfg.n_embd} rounded up, so its three matrices hold "
                                "as many weights as a 4x MLP's two."))
    if cfg.head == "untied":
        parts.append(("untied head", f"the head has its own {cfg.n_embd} × {cfg.vocab_size:,} matrix instead of "
                                     f"reusing the token embedding as GPT-2 does: {cfg.n_embd * cfg.vocab_size:,} "
                                     "more parameters, so reading a token and predicting one are learned "
                                     "separately."))
    if cfg.logit_softcap:
        cap = f"{cfg.logit_softcap:g}"
        parts.append(("logit softcap", f"the logits become {cap} · tanh(logit / {cap}): nearly unchanged while "
                                       f"small, never beyond ±{cap}, so no logit can run away early in training."))
    if cfg.zero_init:
        parts.append(("zero-init", "the projections that write into the residual stream (attention out, MLP out)"
                                   + (" and the untied head" if cfg.head == "untied" else "")
                                   + " start at exactly zero: every block begins as the identity"
                                   + (f", and every logit at 0, so the loss at step 0 is ln({cfg.vocab_size:,}) = "
                                      f"{math.log(cfg.vocab_size):.3f}, a uniform guess" if cfg.head == "untied"
                                      else "")
                                   + "."))
    if cfg.token_shift:
        parts.append(("token shift", f"each position's input adds a learned {cfg.n_embd} × {cfg.n_embd} map of the "
                                     "previous token's embedding (starting at zero), so a key can say which token "
                                     "came before it: one attention layer can then find where the current token "
                                     "appeared earlier and copy what followed it, the skill a reading question "
                                     "needs."))
    return parts


@dataclasses.dataclass(frozen=True)
class Diagram:
    """The model's block diagram, as figures.model_diagram draws it; shapes as the forward pass made them."""

    flow: list[tuple[str, str, str]]  # (box, kind, the shape on the arrow leaving it), top to bottom
    expanded: int  # the flow box drawn again in detail: the first block
    block: list[tuple[str, str, str]]  # its norm, attention, norm, MLP: (box, kind, shape out)
    stream: str  # the residual stream's shape


def model_diagram(model: GPT, ids: list[int]) -> Diagram:
    """The boxes of the model in the order data flows through them, each arrow labelled with the shape of the
    activation it carries in a forward pass over `ids` (activation_shapes: hooks on the real modules)."""
    cfg, shapes = model.config, dict(activation_shapes(model, ids))
    stream = shape_text(shapes["token embedding"])
    flow = [("input ids", "data", shape_text(shapes["input ids"])),
            (f"token embedding (wte)\n{cfg.vocab_size:,} × {cfg.n_embd}", "embed", stream)]
    if cfg.positions == "learned":
        flow.append((f"+ position embedding (wpe)\n{cfg.block_size} × {cfg.n_embd}", "embed", stream))
    shown = list(range(cfg.n_layer)) if cfg.n_layer <= 4 else [0, 1, None, cfg.n_layer - 1]
    for layer in shown:
        if layer is None:
            flow.append((f"⋮  {cfg.n_layer - 3} more blocks", "data", stream))
        else:
            flow.append((f"block {layer}", "block", shape_text(shapes[f"block {layer} out (residual stream)"])))
    flow += [(f"final norm ({cfg.norm})", "norm", shape_text(shapes["final norm"])),
             (f"head (lm_head, {cfg.head})\n{cfg.n_embd} × {cfg.vocab_size:,}", "head",
              shape_text(shapes["logits"]) + "  logits"),
             ("softmax", "head", shape_text(shapes["logits"]) + "  probabilities"),
             ("next-token probabilities", "data", "")]
    expanded = next(i for i, (box, _, _) in enumerate(flow) if box == "block 0")
    rotated = "\nRoPE turns q and k by position" if cfg.positions == "rope" else ""
    block = [(f"norm ({cfg.norm})", "norm", shape_text(shapes["block 0: norm"])),
             (f"attention: {cfg.n_head} heads of {cfg.head_dim}\n"
              f"q, k, v {shape_text(shapes['block 0: q, k, v together'])}{rotated}\n"
              f"weights {shape_text(shapes['block 0: attention weights'])}", "attention",
              shape_text(shapes["block 0: attention out"])),
             (f"norm ({cfg.norm})", "norm", shape_text(shapes["block 0: norm"])),
             (f"MLP ({cfg.mlp}): {cfg.n_embd} → {cfg.mlp_hidden} → {cfg.n_embd}\n"
              f"hidden {shape_text(shapes['block 0: MLP hidden'])}", "mlp", shape_text(shapes["block 0: MLP out"]))]
    return Diagram(flow, expanded, block, stream)


MLP_WORDS = {"gelu": "GELU, a smooth ReLU", "relu2": "the squared ReLU", "swiglu": "a SiLU gate"}


def part_sentences(cfg: GPTConfig, T: int) -> list[Text]:
    """One plain sentence (or two) per part of the model, in the order data flows, each before the part's name
    is used elsewhere."""
    positions = (
        "Yours uses rotary positions (RoPE): each query and key (see attention below) is rotated by an angle that "
        "grows with its position, so the score between two tokens depends on how far apart they are; nothing is "
        "learned for it."
        if cfg.positions == "rope" else
        f"Yours uses learned positions (`wpe`): a second table, one row of {cfg.n_embd} numbers for each of the "
        f"{cfg.block_size} positions, added to each token's row; it is one reason the model reads at most "
        f"{cfg.block_size} tokens.")
    norm = ("divides it by the root mean square of its numbers" if cfg.norm == "rmsnorm" else
            "subtracts the mean of its numbers and divides by their standard deviation")
    return [
        Text(f"Token embedding (`wte`): a table with one row of {cfg.n_embd} numbers for each of the "
             f"{cfg.vocab_size:,} ids; looking an id up turns a token into a vector the model can compute with."),
        Text("Positions: order matters, since \"the dog bit the man\" and \"the man bit the dog\" hold the same "
             "tokens and mean different things. Attention (below) compares tokens the same way wherever they sit, "
             "so without a mark of position the model would read a bag of tokens. " + positions),
        Text(f"The residual stream: the {cfg.n_embd} numbers of each position, carried from the embedding to the "
             "head. Each block reads the stream and adds what it computes back into it (x = x + f(x)) instead of "
             "replacing it, so what a block leaves alone passes through, and gradients reach the first layers "
             "directly."),
        Text(f"Norm ({cfg.norm}): rescales each position's vector before a part reads it (it {norm}), so every "
             "block sees inputs of the same size however the stream grows."),
        Text(f"Attention: the only place where positions exchange information. Each position compares itself with "
             f"every position up to its own and takes a weighted average of what they offer; {cfg.n_head} "
             f"heads do this side by side, each on {cfg.head_dim} of the {cfg.n_embd} channels. The next chapter "
             "works through it with your model's numbers."),
        Text(f"MLP ({cfg.mlp}): works on each position alone: widens its {cfg.n_embd} numbers to "
             f"{cfg.mlp_hidden}, applies a nonlinearity ({MLP_WORDS[cfg.mlp]}) and narrows back to {cfg.n_embd}."),
        Text(f"A block is norm → attention → add to the stream, then norm → MLP → add; yours stacks "
             f"{cfg.n_layer}, each with its own weights."),
        Text(f"Final norm and head (`lm_head`): a last norm, then one matrix of {cfg.n_embd} × {cfg.vocab_size:,} "
             f"turns each position's vector into {cfg.vocab_size:,} scores, the logits, one per id of the "
             "vocabulary."),
        Text("Softmax: exponentiates the logits and divides by their sum, so they become probabilities, positive "
             "and adding up to 1: the model's guess at the next token, at every position at once. Training raises "
             "the probability of the token that did come next (the training chapter)."),
        Text(f"The picture puts them together, for the {T} tokens of `evaluate.attention_text`. On each arrow is "
             f"the shape of what flows along it, B × T × C: B = 1 text, T = {T} tokens, C = `model.n_embd` = "
             f"{cfg.n_embd} numbers per token (a vocabulary-sized last axis for the logits). Training feeds "
             "`train.batch_size` texts of `model.block_size` tokens at once: the same picture with larger B "
             "and T."),
    ]


def params_with(cfg: GPTConfig, **changes: Any) -> int:
    """The parameter count of the model `cfg` describes with `changes` made (built on the meta device: no
    memory, no time)."""
    with torch.device("meta"):
        return GPT(dataclasses.replace(cfg, **changes)).num_params()


def model_exercises(model: GPT) -> list[Exercise]:
    cfg, total = model.config, model.num_params()
    deeper = params_with(cfg, n_layer=cfg.n_layer + 1)
    other_head = "tied" if cfg.head == "untied" else "untied"
    head_params = params_with(cfg, head=other_head)
    return [
        Exercise(f"dvc exp run -S model.n_layer={cfg.n_layer + 1}",
                 "this chapter's parameter count and table, and the experiments chapter, where the run appears "
                 "beside yours with its val bpb and time",
                 f"{deeper:,} parameters instead of {total:,}: one more block of {deeper - total:,}, and that much "
                 "more compute per token, so each step takes longer. Whether the val bpb is lower after the same "
                 "number of steps is what the run tells you; compare the difference with the spread between "
                 "repeated runs.",
                 (("model.n_layer", str(cfg.n_layer + 1)),)),
        Exercise(f"dvc exp run -S model.head={other_head}",
                 "the head row of this chapter's table and the experiments chapter",
                 f"{head_params:,} parameters instead of {total:,}: a {other_head} head "
                 + ("shares the token embedding's matrix, so its " if other_head == "tied" else "has its own, so ")
                 + f"{abs(head_params - total):,} weights "
                 + ("go" if other_head == "tied" else "come in")
                 + ", while the FLOPs per token stay the same (the head multiplies by a matrix of the same shape "
                 "either way).",
                 (("model.head", other_head),)),
    ]


def model_chapter(run: Run, figure_dir: Path) -> Chapter:
    """Chapter 4: each part of the model in a sentence, its block diagram, the newer parts aside, where the
    parameters and FLOPs go, the weights at init and after, two exercises. Long because it is the chapter's prose
    in reading order; the numbers come from the functions above."""
    model, cfg = run.model, run.model.config
    total_params, total_flops = model.num_params(), model.flops_per_token()
    rows = component_table(model)
    table = [(name, what, f"{p:,}", f"{100 * p / total_params:.1f} %", f"{f:,}", f"{100 * f / total_flops:.1f} %")
             for name, what, p, f in rows]
    ids = attention_ids(run)
    diagram = model_diagram(model, ids)
    figures.model_diagram(diagram.flow, diagram.expanded, diagram.block, diagram.stream,
                          figure_dir / "model_diagram.png")
    modern = modern_parts(cfg)
    blocks: list = [
        Text(f"The model is a function from token ids to guesses: for every position of its input it scores each "
             f"of the {cfg.vocab_size:,} ids of the vocabulary as the token that comes next. Yours is a "
             f"decoder-only transformer, preset `{cfg.arch}` (`model.arch`): {cfg.n_layer} blocks, {cfg.n_head} "
             f"attention heads, {cfg.n_embd} numbers per position, a context of {cfg.block_size} tokens, "
             f"{total_params:,} parameters (the numbers training learns). Its parts, in the order the data flows "
             "through them:"),
        *part_sentences(cfg, len(ids)),
        Figure("figures/model_diagram.png",
               f"Your model, from models/final/config.json: the shapes on the arrows are those of a forward pass "
               f"over {len(ids)} tokens (B × T × C = {diagram.stream}); block 0 is drawn again on the right, "
               f"its two halves adding into the residual stream."),
    ]
    if modern:
        blocks.append(Aside(f"The newer parts in your preset ({cfg.arch})",
                            (f"GPT-2 (2019) had none of these; the recipes since added them, and `{cfg.arch}` has "
                             f"{len(modern)}. The model works without them (the gpt2 preset); each makes training "
                             "faster or steadier.",
                             *(f"{name}: {what}" for name, what in modern))))
    blocks += [
        Text(f"Each part is a named choice in `models/final/config.json`: positions {cfg.positions}, norm "
             f"{cfg.norm}, MLP {cfg.mlp}, head {cfg.head}, biases {'on' if cfg.bias else 'off'}, QK-norm "
             f"{'on' if cfg.qk_norm else 'off'}, logit softcap {cfg.logit_softcap or 'off'}. Training costs about "
             f"{total_flops:,} floating-point operations per token: {FLOPS_PER_WEIGHT} per weight of every matrix "
             "(2 forward, 4 backward) plus the attention scores. The table says where the parameters and the "
             "FLOPs go; the embedding lookup costs almost nothing, while the head, one matrix, can cost as much as "
             "all the blocks when the vocabulary is large beside the width."),
        Table(("component", "what it does", "parameters", "share", "FLOPs per token", "share"), table),
    ]
    init, final = weight_stds(run.initial), weight_stds(model)
    layers = list(range(cfg.n_layer))
    figures.curves([("at initialisation", "layer", "standard deviation",
                     [(name, layers, values, "o-") for name, values in init.items()]),
                    ("after training", "layer", "standard deviation",
                     [(name, layers, values, "o-") for name, values in final.items()])],
                   figure_dir / "weight_std.png")
    out_init = init["attention out"][0]
    blocks += [
        Figure("figures/weight_std.png", "Standard deviation of each block's matrices by depth, at initialisation "
                                         "and after training."),
        Text(f"At initialisation the matrices are drawn with standard deviation {INIT_STD}"
             + (", and the projections that write into the residual stream start at zero: every block "
                "begins as the identity, so the first steps train a model as shallow as it needs"
                if cfg.zero_init else
                f", and the projections that write into the residual stream with {INIT_STD} / sqrt(2 x {cfg.n_layer}) "
                f"= {out_init:.4f}, so the stream's variance does not grow with depth")
             + ". Training moves them far from there: compare the two panels."),
        *model_exercises(model),
    ]
    return Chapter("model", "The model", blocks)


# --- 5. attention, step by step ----------------------------------------------------------------------------

@torch.no_grad()
def attention_steps(model: GPT, ids: list[int], layer: int, head: int) -> dict[str, np.ndarray]:
    """One head's attention on `ids`, step by step, as the model computes it: Q, K, V (T, head_dim) of the
    layer's normalised input, the scaled scores QK^T / sqrt(d), the causal mask, the softmax weights and the
    weighted sum of V, the head's output (before the output projection)."""
    x, rope = model.embed(torch.tensor([ids]))
    for block in model.blocks[:layer]:
        x = block(x, rope)
    block = model.blocks[layer]
    q, k, v = block.attn.qkv(block.ln_1(x), rope)
    kv_head = head // (block.attn.n_head // block.attn.n_kv_head)
    q, k, v = q[0, head].float(), k[0, kv_head].float(), v[0, kv_head].float()
    scores = q @ k.T / math.sqrt(q.size(-1))
    mask = torch.ones_like(scores, dtype=torch.bool).tril()
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "scores": scores.numpy(), "mask": mask.numpy(),
            "weights": weights.numpy(), "out": (weights @ v).numpy()}


def row_entropy(maps: np.ndarray) -> np.ndarray:
    """Mean entropy in bits of the attention rows after the first (which can only attend to itself), per
    layer and head: (n_layer, n_head). log2(i + 1) for row i when attention is uniform."""
    rows = maps[..., 1:, :]
    logs = np.log2(np.where(rows > 0, rows, 1.0))
    return -(rows * logs).sum(-1).mean(-1)


@dataclasses.dataclass(frozen=True)
class WorkedRow:
    """One query's row of the attention, worked through: for each key j, the raw score, the score after the mask
    (−inf for a later key), e^(score − the row's largest), the softmax weight; then the weighted sum of the
    values, the head's output for that query."""

    row: int  # the query's position
    scores: np.ndarray  # (T,) q·k / sqrt(d), before the mask
    masked: np.ndarray  # (T,) −inf after the query's position
    exps: np.ndarray  # (T,) e^(masked − max), 0 where masked
    weights: np.ndarray  # (T,) the model's softmax weights: exps / exps.sum()
    values: np.ndarray  # (T, d) V
    out: np.ndarray  # (d,) weights @ values


def worked_row(steps: dict[str, np.ndarray], row: int) -> WorkedRow:
    """Row `row` of attention_steps, worked through as the softmax does it: the weights and the output are the
    model's own (attention_steps'), the exponentials what they are made of."""
    scores = steps["scores"][row].astype(np.float64)
    masked = np.where(steps["mask"][row], scores, -np.inf)
    exps = np.exp(masked - masked.max())
    return WorkedRow(row, scores, masked, exps, steps["weights"][row], steps["v"], steps["out"][row])


def worked_table(worked: WorkedRow, labels: list[str], channels: int = 2) -> list[tuple[str, ...]]:
    """The table of a worked row: a line per key (the later ones after the third past the query summed up in
    one line when there are many), then the sums of the exponentials and the weights, and the output: the
    weighted sum of the first `channels` of V."""
    T = len(labels)
    shown = T if T <= 16 else worked.row + 4
    rows = []
    for j in range(shown):
        masked = not np.isfinite(worked.masked[j])
        rows.append((str(j), labels[j], f"{worked.scores[j]:.3f}", "−∞" if masked else f"{worked.masked[j]:.3f}",
                     "0" if masked else f"{worked.exps[j]:.4f}", "0" if masked else f"{worked.weights[j]:.4f}",
                     *(f"{worked.values[j, c]:.3f}" for c in range(channels))))
    if shown < T:
        rows.append((f"{shown}-{T - 1}", "…", "…", "−∞", "0", "0", *("…" for _ in range(channels))))
    rows.append(("sum", "", "", "", f"{worked.exps.sum():.4f}", f"{worked.weights.sum():.4f}",
                 *("" for _ in range(channels))))
    rows.append(("output", "Σ weight × v", "", "", "", "", *(f"{worked.out[c]:.3f}" for c in range(channels))))
    return rows


def head_options(cfg: GPTConfig) -> tuple[int, int] | None:
    """(n_head, n_kv_head) of a valid config with twice (else half) the heads, the key/value heads following when
    they equal the query heads (params.yaml's null); None when neither is valid."""
    for heads in (2 * cfg.n_head, cfg.n_head // 2):
        kv = heads if cfg.n_kv_head == cfg.n_head else cfg.n_kv_head
        if heads < 1 or cfg.n_embd % heads or heads % kv or (cfg.positions == "rope" and cfg.n_embd // heads % 2):
            continue
        return heads, kv
    return None


EXERCISE_TEXT = "Now is the winter of our discontent made glorious summer"


def attention_exercises(run: Run, maps: np.ndarray) -> list[Exercise]:
    model, cfg = run.model, run.model.config
    previous = np.array([[np.mean(np.diagonal(maps[layer, head], offset=-1)) for head in range(cfg.n_head)]
                         for layer in range(cfg.n_layer)])  # mean weight on the token just before
    layer, head = (int(i) for i in np.unravel_index(previous.argmax(), previous.shape))
    exercises = []
    options = head_options(cfg)
    if options is not None:
        heads, kv = options
        params = params_with(cfg, n_head=heads, n_kv_head=kv)
        same = params == model.num_params()
        exercises.append(Exercise(
            f"dvc exp run -S model.n_head={heads}",
            "the Q, K, V figures and every head's map in this chapter, and the experiments chapter's val bpb",
            f"{heads} heads of {cfg.n_embd // heads} channels each instead of {cfg.n_head} of {cfg.head_dim}, and "
            + (f"the same {params:,} parameters: the same matrices, cut into heads differently. " if same else
               f"{params:,} parameters instead of {model.num_params():,} (the key/value heads are set apart). ")
            + "More, narrower heads can each follow a different pattern; whether that helps at this size is what "
              "the val bpb says.",
            (("model.n_head", str(heads)),)))
    exercises.append(Exercise(
        f"dvc exp run -S 'evaluate.attention_text=\"{EXERCISE_TEXT}\"'",
        "this chapter and the next, redrawn on your sentence",
        f"Training runs again (the text is recorded as it trains), and the figures show your sentence. On this "
        f"text, layer {layer} head {head} puts on average {previous[layer, head]:.2f} of its weight on the token "
        "just before; look for the same diagonal just below the main one on yours.",
        (("evaluate.attention_text", EXERCISE_TEXT),)))
    return exercises


def attention_figures(steps: dict[str, np.ndarray], maps: np.ndarray, labels: list[str], cfg: GPTConfig, layer: int,
                      head: int, row: int, text: str, figure_dir: Path) -> None:
    """The chapter's figures: the shapes of x, the weights and Q, K, V; this head's Q, K and V (at most
    QKV_CHANNELS channels), its scores, mask, masked scores and weights, its output (the worked `row` framed);
    every head of the model on `text`."""
    T, d = len(labels), cfg.head_dim
    kv_head = head // (cfg.n_head // cfg.n_kv_head)
    figures.shape_blocks(("x", T, cfg.n_embd), [("W_q", "Q", cfg.n_head * d, cfg.n_head, head),
                                                ("W_k", "K", cfg.n_kv_head * d, cfg.n_kv_head, kv_head),
                                                ("W_v", "V", cfg.n_kv_head * d, cfg.n_kv_head, kv_head)],
                         figure_dir / "attention_shapes.png")
    channels = min(d, QKV_CHANNELS)
    figures.matrices([("Q (queries)", steps["q"][:, :channels], "RdBu_r"),
                      ("K (keys)", steps["k"][:, :channels], "RdBu_r"),
                      ("V (values)", steps["v"][:, :channels], "RdBu_r")],
                     labels, figure_dir / "attention_qkv.png", columns=1)
    additive = np.where(steps["mask"], 0.0, -np.inf)
    figures.matrices([(f"scores QK^T / sqrt({d})", steps["scores"], "RdBu_r"),
                      ("causal mask: 0, or −∞ (grey) after the query", additive, "RdBu_r"),
                      ("masked scores: scores + mask (grey: −∞)", steps["scores"] + additive, "RdBu_r"),
                      ("softmax weights", steps["weights"], "viridis")],
                     labels, figure_dir / "attention_scores.png", col_labels=labels, columns=2, highlight_row=row)
    figures.matrices([("weights x V: the head's output", steps["out"][:, :channels], "RdBu_r")], labels,
                     figure_dir / "attention_output.png", highlight_row=row)
    figures.attention_heads(maps, labels, f"every head of the final model: {text!r}",
                            figure_dir / "attention_heads.png")


def attention_chapter(run: Run, figure_dir: Path) -> Chapter:
    """Chapter 5: one head of the final model on `evaluate.attention_text`, from x to its output, a row worked
    through with its numbers, then every head, two exercises. Long because it is the chapter's prose in reading
    order; the figures are attention_figures', the numbers attention_steps'."""
    model, cfg = run.model, run.model.config
    ids = attention_ids(run)
    labels = [token_label(run.tokenizer, i) for i in ids]
    T, d = len(ids), cfg.head_dim
    maps = model.attention_maps(torch.tensor([ids])).numpy()
    entropy = row_entropy(maps)
    layer, head = (int(i) for i in np.unravel_index(entropy.argmin(), entropy.shape))
    steps = attention_steps(model, ids, layer, head)
    worked = worked_row(steps, T // 2)
    attention_figures(steps, maps, labels, cfg, layer, head, worked.row, run.settings.evaluate.attention_text,
                      figure_dir)
    channels = min(d, QKV_CHANNELS)
    last = steps["weights"][-1]
    top = np.argsort(last)[::-1][:3]
    attended = ", ".join(f"{labels[j]!r} ({last[j]:.2f})" for j in top)
    sliced = f" (the first {channels} of its {d} channels)" if channels < d else ""
    i, query = worked.row, labels[worked.row]
    blocks: list = [
        Text(f"Attention is how a position reads the positions before it. Here is one head, layer {layer} head "
             f"{head} (the most focused head of the final model: the lowest mean entropy of its rows, "
             f"{entropy[layer, head]:.2f} bits), on `evaluate.attention_text`, {T} tokens. Its input x is the "
             f"block's normalised stream: one row of {cfg.n_embd} numbers per token, a {T} × {cfg.n_embd} matrix. "
             "Three learned matrices turn each row into a query (what this token looks for), a key (what it "
             f"offers to others' queries) and a value (what it passes on if read), {d} numbers each per head."),
        Text(f"W_q has {cfg.n_embd} rows and {cfg.n_head * d} columns: {cfg.n_head} heads of {d}, side by side, so "
             f"x W_q gives Q, {T} × {cfg.n_head * d}, whose columns are cut into the heads' queries. W_k and W_v "
             f"give K and V the same way"
             + (f", for {cfg.n_kv_head} key/value heads shared by {cfg.n_head // cfg.n_kv_head} query heads each "
                "(grouped-query attention)" if cfg.n_kv_head != cfg.n_head else "")
             + ". In the code the three are one matrix, `c_attn`, computed in one multiplication; the picture draws "
               "them apart, to scale, with this head's slices in orange."),
        Figure("figures/attention_shapes.png", f"x ({T} × {cfg.n_embd}) times W_q, W_k and W_v gives Q, K and V; "
                                                f"the orange slices are layer {layer} head {head}'s, {T} × {d} each."),
        Text("Each head's queries and keys are "
             + ("normalised (QK-norm) and " if cfg.qk_norm else "")
             + ("rotated by their position (RoPE) before they meet; " if cfg.positions == "rope" else
                "used as they come; ")
             + f"the values are used as they come. Below, this head's three matrices{sliced}, a row per token: "
               "red is positive, blue negative, white zero."),
        Figure("figures/attention_qkv.png", f"Q, K and V of layer {layer}, head {head}: tokens by channels."),
        Text(f"Every query is compared with every key by a dot product, divided by sqrt({d}) so the scores do not "
             "grow with the head's width: a T × T matrix of scores, rows queries, columns keys. The causal mask "
             "then removes the future: a token may read itself and the tokens before it, never after, which is "
             "what lets one pass train on every position of a text at once. The mask adds 0 to a score it keeps "
             "and −∞ to one it removes, drawn grey, a colour apart from zero (white). The softmax gives a −∞ "
             "score the weight 0, since e^−∞ = 0, and turns the surviving scores of each row into weights that "
             "are positive and add up to 1."),
        Figure("figures/attention_scores.png", "The scores, the causal mask, the masked scores (grey: −∞) and the "
                                               f"softmax weights: rows are queries, columns keys; row {i} is worked "
                                               "through below."),
        Text(f"One row worked through: the query of token {i}, {query!r}. Its score against each key; after the "
             f"mask, the keys after position {i} are −∞. The softmax takes e to the power of each masked score (the "
             "row's largest subtracted first, which divides top and bottom by the same number and keeps them "
             "small) and divides each by their sum: the weights. The head's output for this token is the sum of "
             f"the value rows, each times its weight: the last line, for the first two of its {d} channels."),
        Table(("key", "token", "score", "masked", "e^(s − max)", "weight", "v[0]", "v[1]"),
              worked_table(worked, labels)),
        Text(f"Every row is computed that way at once: the weights times V give the head's output, {T} × {d}. The "
             f"last token, {labels[-1]!r}, puts most weight on {attended}. The outputs of all {cfg.n_head} heads "
             "are put side by side again and projected back into the residual stream."),
        Figure("figures/attention_output.png", f"The weighted sum of V: one row per token{sliced}."),
        Text("Every head of every layer on the same text. Heads specialise: some look at the previous token, some "
             "at the start of the text (`<|endoftext|>` often serves as a place to put attention that is not "
             "needed), some at earlier occurrences of related tokens."),
        Figure("figures/attention_heads.png", f"The attention weights of all {cfg.n_layer} x {cfg.n_head} heads."),
        *attention_exercises(run, maps),
    ]
    return Chapter("attention", "Attention, step by step", blocks)
