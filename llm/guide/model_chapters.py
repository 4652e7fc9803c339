"""Chapters 4-5: the model and attention step by step."""

import math
from pathlib import Path

import numpy as np
import torch

from llm.attention import probe_ids
from llm.guide import figures
from llm.guide.document import Chapter, Figure, Table, Text
from llm.guide.inputs import Run
from llm.model import FLOPS_PER_WEIGHT, GPT, INIT_STD
from llm.plots import plot_attention
from llm.tokenizer import token_label


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


def model_chapter(run: Run, figure_dir: Path) -> Chapter:
    model, cfg = run.model, run.model.config
    total_params, total_flops = model.num_params(), model.flops_per_token()
    rows = component_table(model)
    table = [(name, what, f"{p:,}", f"{100 * p / total_params:.1f} %", f"{f:,}", f"{100 * f / total_flops:.1f} %")
             for name, what, p, f in rows]
    ids = attention_ids(run)
    shapes = activation_shapes(model, ids)
    blocks: list = [
        Text(f"The model is a decoder-only transformer, preset `{cfg.arch}`: {cfg.n_layer} blocks of {cfg.n_head} "
             f"attention heads over a residual stream of {cfg.n_embd} numbers per position, a context of "
             f"{cfg.block_size} tokens, {total_params:,} parameters. Each part is a named choice in "
             f"`models/final/config.json`: positions {cfg.positions}, norm {cfg.norm}, MLP {cfg.mlp}, head "
             f"{cfg.head}, biases {'on' if cfg.bias else 'off'}, QK-norm {'on' if cfg.qk_norm else 'off'}, logit "
             f"softcap {cfg.logit_softcap or 'off'}."),
        Text(f"Training costs about {total_flops:,} floating-point operations per token: {FLOPS_PER_WEIGHT} per "
             "weight of every matrix (2 forward, 4 backward) plus the attention scores. The table says where they "
             "go; the embedding lookup costs almost nothing, while the head, one matrix, can cost as much as all "
             "the blocks when the vocabulary is large beside the width."),
        Table(("component", "what it does", "parameters", "share", "FLOPs per token", "share"), table),
        Text(f"One forward pass over `evaluate.attention_text` ({len(ids)} tokens with the leading "
             f"`<|endoftext|>`): the shape of the activations, batch first."),
        Table(("where", "shape"), [(name, " x ".join(map(str, shape))) for name, shape in shapes]),
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


def attention_chapter(run: Run, figure_dir: Path) -> Chapter:
    model, cfg = run.model, run.model.config
    ids = attention_ids(run)
    labels = [token_label(run.tokenizer, i) for i in ids]
    maps = model.attention_maps(torch.tensor([ids])).numpy()
    entropy = row_entropy(maps)
    layer, head = (int(i) for i in np.unravel_index(entropy.argmin(), entropy.shape))
    steps = attention_steps(model, ids, layer, head)
    d = cfg.head_dim
    figures.matrices([("Q (queries)", steps["q"], "RdBu_r"), ("K (keys)", steps["k"], "RdBu_r"),
                      ("V (values)", steps["v"], "RdBu_r")], labels, figure_dir / "attention_qkv.png")
    masked = np.where(steps["mask"], steps["scores"], np.nan)
    figures.matrices([(f"scores QK^T / sqrt({d})", steps["scores"], "RdBu_r"),
                      ("causal mask (1 = may attend)", steps["mask"].astype(float), "Greys"),
                      ("masked scores", masked, "RdBu_r"), ("softmax weights", steps["weights"], "viridis")],
                     labels, figure_dir / "attention_scores.png", col_labels=labels)
    figures.matrices([("weights x V: the head's output", steps["out"], "RdBu_r")], labels,
                     figure_dir / "attention_output.png")
    plot_attention(maps, labels, f"every head of the final model: {run.settings.evaluate.attention_text!r}",
                   figure_dir / "attention_heads.png")
    last = steps["weights"][-1]
    top = np.argsort(last)[::-1][:3]
    attended = ", ".join(f"{labels[j]!r} ({last[j]:.2f})" for j in top)
    blocks: list = [
        Text(f"Attention is how a position reads the positions before it. Here is one head, layer {layer} head "
             f"{head} (the most focused head of the final model: the lowest mean entropy of its rows, "
             f"{entropy[layer, head]:.2f} bits), on `evaluate.attention_text`, {len(ids)} tokens. The block's "
             f"normalised input (one row of {cfg.n_embd} per token) is multiplied by three learned matrices: each "
             f"token gets a query (what it looks for), a key (what it offers) and a value (what it passes on), "
             f"{d} numbers each"
             + (", queries and keys normalised and rotated by their position (RoPE)" if cfg.positions == "rope"
                else "") + "."),
        Figure("figures/attention_qkv.png", f"Q, K and V of layer {layer}, head {head}: tokens by {d} channels."),
        Text(f"Every query is compared with every key by a dot product, divided by sqrt({d}) so the scores do not "
             "grow with the head's width. The causal mask removes the future: a token may attend to itself and to "
             "tokens before it, never after, which is what lets one pass train on every position of a sequence at "
             "once. The softmax turns each row of surviving scores into weights that are positive and sum to 1."),
        Figure("figures/attention_scores.png", "Scores, the causal mask, the masked scores and the softmax "
                                               "weights: rows are queries, columns keys."),
        Text(f"The head's output for each token is the weighted sum of the values: the last token, "
             f"{labels[-1]!r}, puts most weight on {attended}. The outputs of all {cfg.n_head} heads are "
             "concatenated and projected back into the residual stream."),
        Figure("figures/attention_output.png", "The weighted sum of V: one row per token."),
        Text("Every head of every layer on the same text. Heads specialise: some look at the previous token, some "
             "at the start of the text (`<|endoftext|>` often serves as a place to put attention that is not "
             "needed), some at earlier occurrences of related tokens."),
        Figure("figures/attention_heads.png", f"The attention weights of all {cfg.n_layer} x {cfg.n_head} heads."),
    ]
    return Chapter("attention", "Attention, step by step", blocks)
