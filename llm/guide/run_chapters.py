"""Chapters 7 and 8: training and generation (9, instruction tuning, is in sft_chapter.py; 10, the experiments, in
experiments_chapter.py)."""

import time
from pathlib import Path

import torch

from llm.configs.train import TrainConfig
from llm.generate import filter_logits, prompt_ids
from llm.guide import figures
from llm.guide.document import Chapter, Figure, Pre, Table, Text, literal
from llm.guide.inputs import Run
from llm.model import GPT
from llm.optim import group_lrs, peak_lrs
from llm.parallel import apply_activation_checkpointing
from llm.report import read_samples
from llm.tokenizer import token_text
from llm.train import autocast, has_fast_bf16

# --- 7. training -------------------------------------------------------------------------------------------

def saved_activation_bytes(model: GPT, tokens: torch.Tensor, dtype: str) -> int:
    """Bytes of the tensors one forward pass keeps for the backward pass besides the weights themselves (the
    activation memory of a micro-batch): each storage autograd saves, counted once. The step is then run
    backward and thrown away."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(tokens.device, dtype):
        _, loss = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def step_seconds(model: GPT, tokens: torch.Tensor, dtype: str, repeats: int = 2) -> float:
    """Seconds of one forward and backward pass (after one untimed warm-up)."""
    timings = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with autocast(tokens.device, dtype):
            _, loss = model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        loss.backward()
        timings.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return min(timings[1:])


def memory_and_time(run: Run) -> list[tuple[str, int, float | None]]:
    """(variant, saved activation bytes for one sequence, seconds per step of two sequences) for this model:
    as trained in float32, with activation checkpointing, with bf16 autocast (timed only where the hardware
    multiplies bf16: elsewhere torch emulates it, a hundred times slower)."""
    cfg = run.model.config
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.block_size + 1), generator=torch.Generator().manual_seed(0))
    fast_bf16 = has_fast_bf16(torch.device("cpu"))
    variants = []
    for name, dtype, checkpointed in (("float32", "float32", False), ("float32 + activation checkpointing",
                                                                       "float32", True),
                                      ("bf16 autocast", "bfloat16", False)):
        model = GPT(cfg)
        model.load_state_dict(run.model.state_dict())
        if checkpointed:
            apply_activation_checkpointing(model)
        sample = tokens[:1, : 65] if dtype == "bfloat16" and not fast_bf16 else tokens[:1]
        saved = saved_activation_bytes(model, sample, dtype) * (cfg.block_size / (sample.size(1) - 1))
        seconds = step_seconds(model, tokens, dtype) if dtype == "float32" or fast_bf16 else None
        variants.append((name, int(saved), seconds))
    return variants


LR_LABELS = {"adamw": "train.lr (AdamW)", "muon": "train.muon_lr (Muon)"}  # by llm.optim.peak_lrs' names


def lr_curves(cfg: TrainConfig) -> list[tuple[str, list[int], list[float], str]]:
    """(label, steps, lrs, style) of each optimizer: its lr at every step (1-based, as the history counts
    them), by the training's own schedule and the rule set_lr applies (llm.optim.group_lrs)."""
    per_step = [group_lrs(step, cfg) for step in range(cfg.max_steps)]
    steps = list(range(1, cfg.max_steps + 1))
    return [(LR_LABELS[name], steps, [lrs[name] for lrs in per_step], "-") for name in peak_lrs(cfg)]


def training_chapter(run: Run, figure_dir: Path) -> Chapter:
    cfg, metrics, history = run.settings.train, run.train_metrics, run.history
    model_cfg = run.model.config
    tokens_per_step = metrics["tokens_seen"] // max(metrics["steps"], 1)
    world = tokens_per_step // (cfg.batch_size * cfg.grad_accum_steps * model_cfg.block_size)
    val_rows = [r for r in history if r.val_loss is not None]
    steps = [r.step for r in history]
    figures.curves([
        ("loss", "tokens seen", "nats per token",
         [("train", [r.tokens_seen for r in history], [r.train_loss for r in history], "-"),
          ("val", [r.tokens_seen for r in val_rows], [r.val_loss for r in val_rows], "o-")]),
        ("learning rate", "step", "lr", lr_curves(cfg)),
        ("gradient norm (before clipping)", "step", "norm", [("grad norm", steps, [r.grad_norm for r in history],
                                                              "o-")]),
        ("speed", "step", "tokens per second", [("tokens/s", steps, [r.tokens_per_sec for r in history], "o-")]),
        ("model FLOPs utilisation", "step", "% of peak", [("MFU", steps, [100 * r.mfu for r in history], "o-")]),
    ], figure_dir / "training.png", columns=3)
    bpb = run.eval_metrics["val_bpb"]
    blocks: list = [
        Text(f"Training ran {metrics['steps']:,} steps of {tokens_per_step:,} tokens each "
             f"({cfg.batch_size} sequences x {cfg.grad_accum_steps} accumulation micro-steps x {world} "
             f"process{'es' if world > 1 else ''} x {model_cfg.block_size} tokens): {metrics['tokens_seen']:,} "
             f"tokens, {metrics['tokens_seen'] / run.meta.splits['train'].tokens:.2f} passes over the train split. "
             f"The optimizer was {cfg.optimizer}"
             + (f" (Muon, orthogonalised momentum, for the matrices inside the blocks at peak lr {cfg.muon_lr}; "
                f"AdamW at {cfg.lr} for the embedding, the head and the norms)" if cfg.optimizer == "muon"
                else f" at peak lr {cfg.lr}")
             + f", warmed up over {cfg.warmup_steps} steps, then decayed on a cosine to {cfg.min_lr}."),
        Figure("figures/training.png", "Loss against tokens seen (train: the mean of each logged interval; val: "
                                       "fixed held-out batches), the learning rate at every step, the gradient "
                                       "norm, the speed and the MFU of each logged interval."),
        Text(f"The run ended at train loss {metrics['train_loss']:.3f} and val loss {metrics['val_loss']:.3f} "
             f"nats per token; the evaluate stage, scoring every val token, measured {bpb:.4f} bits per byte. It "
             f"trained at {metrics['tokens_per_sec']:,.0f} tokens per second, {100 * metrics['mfu']:.1f} % of the "
             f"{metrics['peak_flops'] / 1e9:,.0f} GFLOP/s peak ({metrics['peak_flops_source']}), in "
             f"{metrics['dtype']}."),
    ]
    variants = memory_and_time(run)
    base_saved, base_seconds = variants[0][1], variants[0][2]
    rows = [(name, f"{saved / 1e6:,.1f} MB", f"{saved / base_saved:.2f}x",
             f"{seconds * 1e3:,.0f} ms" if seconds is not None else "not timed",
             f"{seconds / base_seconds:.2f}x" if seconds is not None else "")
            for name, saved, seconds in variants]
    micro = cfg.batch_size * base_saved
    fast_bf16 = has_fast_bf16(torch.device("cpu"))
    blocks += [
        Text(f"What the memory settings change, measured now on this model: the bytes one sequence of "
             f"{model_cfg.block_size} tokens keeps for the backward pass, and the time of a forward and backward "
             "pass over two sequences. Activation checkpointing keeps only each block's input and recomputes the "
             "rest during the backward pass: less memory for about a third more compute. bf16 autocast halves "
             "what the matrix multiplications keep and, on hardware with bf16 units (recent GPUs, CPUs with AMX or "
             f"AVX-512 BF16), runs them several times faster; this machine {'has' if fast_bf16 else 'has no'} such "
             f"units, so `train.dtype: auto` chose {metrics['dtype']}."),
        Table(("variant", "activations per sequence", "vs float32", "step of 2 sequences", "vs float32"), rows),
        Text(f"Gradient accumulation runs `train.grad_accum_steps` micro-batches before each optimizer step and "
             f"adds their gradients: the step sees their tokens together, while memory holds one micro-batch's "
             f"activations (here {cfg.batch_size} sequences, about {micro / 1e6:,.0f} MB). Twice the accumulation "
             "with half the batch size trains on the same tokens per step with half the activation memory, at "
             "the same number of FLOPs."),
    ]
    return Chapter("training", "Training", blocks)


# --- 8. generation -----------------------------------------------------------------------------------------

def next_token_distributions(model: GPT, ids: list[int], temperature: float, top_k: int,
                             top_p: float) -> list[tuple[str, torch.Tensor]]:
    """The probabilities of the next token, as sampling transforms them in turn (llm.generate.sample):
    the model's softmax, then after temperature, after top-k, after top-p."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[-model.config.block_size:]]))
    logits = logits[0, -1].float()
    scaled = logits / temperature if temperature > 0 else logits
    return [("the model's softmax", logits.softmax(-1)),
            (f"temperature {temperature}" if temperature > 0 else "temperature 0 (greedy)", scaled.softmax(-1)),
            (f"top-k {top_k}" if top_k else "top-k off", filter_logits(scaled, top_k, 1.0).softmax(-1)),
            (f"top-p {top_p}" if top_p < 1 else "top-p off", filter_logits(scaled, top_k, top_p).softmax(-1))]


def sampling_steps(temperature: float, top_k: int, top_p: float, counts: list[int], top_share: float) -> str:
    """What each sampling setting did to the distribution, in words (`counts`: tokens left after each stage)."""
    if temperature == 0:
        scaled = ("temperature 0 is greedy: the most likely token is taken, nothing is drawn (the bars show the "
                  "distribution it is taken from)")
    else:
        effect = "sharpens" if temperature < 1 else "flattens" if temperature > 1 else "leaves"
        scaled = (f"dividing the logits by the temperature {temperature} {effect} it (the top token now has "
                  f"{top_share:.3f})")
    k = (f"top-k keeps the {top_k} most likely tokens ({counts[2]:,} left of {counts[1]:,})" if top_k
         else "top-k is off (`evaluate.top_k: 0`)")
    p = (f"top-p keeps the fewest tokens whose probability reaches {top_p} ({counts[3]:,} left)" if top_p < 1
         else "top-p is off (`evaluate.top_p: 1.0`)")
    text = f"{scaled}; {k}; {p}."
    return text[0].upper() + text[1:]


def generation_chapter(run: Run, figure_dir: Path) -> Chapter:
    cfg = run.settings.evaluate
    prompt = cfg.prompts[0]
    ids = prompt_ids(run.tokenizer, prompt, run.eot_id)
    stages = next_token_distributions(run.model, ids, cfg.temperature, cfg.top_k, cfg.top_p)
    shown = torch.argsort(stages[0][1], descending=True)[:15].tolist()
    labels = [repr(token_text(run.tokenizer, i)) for i in shown]
    figures.distributions([(title, [float(p[i]) for i in shown]) for title, p in stages], labels,
                          figure_dir / "next_token.png")
    counts = [int((p > 0).sum()) for _, p in stages]
    top = shown[0]
    blocks: list = [
        Text(f"Generation feeds the model its own output, one token at a time. After the prompt "
             f"{literal(repr(prompt))} ({len(ids)} tokens), the model gives a probability to each of the "
             f"{run.model.config.vocab_size:,} tokens; the most likely next token is {labels[0]} at "
             f"{float(stages[0][1][top]):.3f}. Sampling then transforms the distribution, as "
             f"`evaluate.temperature`, `evaluate.top_k` and `evaluate.top_p` say:"),
        Text(sampling_steps(cfg.temperature, cfg.top_k, cfg.top_p, counts, float(stages[1][1][top]))
             + " One token is drawn from what remains, with the sample's seeded generator, so the same seed "
               "writes the same text."),
        Figure("figures/next_token.png", "The probability of the 15 most likely next tokens, as each step of "
                                         "sampling leaves it."),
        Text(f"The samples of the evaluate stage (reports/samples.md): each prompt of `evaluate.prompts` sampled "
             f"with its own seed, up to {cfg.max_new_tokens} new tokens."),
    ]
    for sample in read_samples(run.samples):
        blocks += [Text(f"{literal(sample.title)} (seed {sample.seed})"), Pre(sample.prompt + sample.continuation)]
    return Chapter("generation", "Generation", blocks)
