"""Chapters 7 and 8: training and generation (9, instruction tuning, is in sft_chapter.py; 10, the experiments, in
experiments_chapter.py)."""

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from llm.configs.evaluate import EvaluateConfig
from llm.configs.train import TrainConfig
from llm.data import VAL_STREAM, TokenWindows
from llm.generate import filter_logits, prompt_ids
from llm.guide.document import Chapter, Exercise, Figure, Pre, Table, Text, Tokens, literal
from llm.guide.inputs import Run
from llm.guide.run_figures import sampling_figure, training_figure
from llm.history import HistoryRow
from llm.model import GPT
from llm.optim import group_lrs, peak_lrs
from llm.parallel import apply_activation_checkpointing
from llm.plots import plt, save_figure
from llm.report import read_samples
from llm.tokenizer import token_text
from llm.train import autocast, has_fast_bf16

# --- 7. training: the objective -----------------------------------------------------------------------------

SHOWN_POSITIONS = 8  # rows of the worked example of the objective


@dataclasses.dataclass(frozen=True)
class Objective:
    """The training objective worked on one window of the reader's val text: the first window of the fixed
    batches the training evaluates on."""

    ids: list[int]  # block_size + 1 tokens: the inputs are ids[:-1], the targets ids[1:]
    target_probs: list[float]  # the final model's probability of each target, position by position
    final_loss: float  # the final model's mean cross-entropy over the window (nats per token)
    initial_loss: float  # the same for the weights training started from (train.seed)


def objective_window(run: Run) -> Objective:
    cfg = run.model.config
    windows = TokenWindows(run.meta.shard_paths(run.paths.tokens, "val"), cfg.block_size, cfg.vocab_size,
                           f"{run.paths.tokens}: the val split")
    x, y = windows.batch(run.settings.train.batch_size, run.settings.train.seed, VAL_STREAM)
    x, y = x[:1], y[:1]
    with torch.no_grad():
        logits, final = run.model(x, y)
        _, initial = run.initial(x, y)
    probs = logits[0].float().softmax(-1).gather(1, y[0, :, None])[:, 0]
    return Objective([*x[0].tolist(), int(y[0, -1])], probs.tolist(), float(final), float(initial))


def nats(probability: float) -> float:
    """The cross-entropy of a target given `probability`: -ln p (infinite at 0)."""
    return -math.log(probability) if probability > 0 else math.inf


def objective_rows(tokenizer: Tokenizer, objective: Objective, count: int) -> list[tuple[str, ...]]:
    """Per position t of the window's first `count`: t, the input up to t (its last five tokens), the target
    (token t + 1), the final model's probability of the target and its loss."""
    rows = []
    for t in range(min(count, len(objective.target_probs))):
        context = "".join(token_text(tokenizer, i) for i in objective.ids[max(0, t - 4):t + 1])
        p = objective.target_probs[t]
        rows.append((str(t), ("…" if t > 4 else "") + repr(context), repr(token_text(tokenizer, objective.ids[t + 1])),
                     f"{p:.3f}" if p >= 0.001 else f"{p:.1e}", f"{nats(p):.2f}"))
    return rows


def bits_text(eval_metrics: dict[str, Any], train_metrics: dict[str, Any]) -> str:
    """Nats to bits per token, and (where the evaluate stage counted the val bytes) to its bits per byte."""
    loss = eval_metrics.get("val_loss", train_metrics["val_loss"])
    bits = loss / math.log(2)
    source = "The evaluate stage's val loss" if "val_loss" in eval_metrics else "The final val loss"
    text = (f"The loss is in nats because it is taken with the natural log; divided by ln 2 = {math.log(2):.4f} "
            f"it is in bits, the number of yes-or-no questions the model's remaining doubt is worth. {source}, "
            f"{loss:.4f} nats per token, is {bits:.4f} bits per token")
    if eval_metrics.get("val_tokens") and eval_metrics.get("val_bytes"):
        per_token = eval_metrics["val_bytes"] / eval_metrics["val_tokens"]
        text += (f"; a val token stands for {per_token:.3f} bytes of text on average, so that is "
                 f"{bits / per_token:.4f} bits per byte: the val bits per byte the evaluate stage reports, a unit "
                 "which, unlike the loss per token, does not depend on how the tokenizer cut the text")
    return text + "."


def objective_blocks(run: Run) -> list:
    cfg = run.model.config
    objective = objective_window(run)
    uniform = math.log(cfg.vocab_size)
    shown = objective.ids[:SHOWN_POSITIONS + 1]
    return [
        Text(f"What training optimises. At every position of a text the model gives each of the "
             f"{cfg.vocab_size:,} tokens a probability of coming next. Training cuts windows of `model.block_size` "
             f"+ 1 = {cfg.block_size + 1} tokens out of the train shards: the first {cfg.block_size} are the input, "
             f"and the same tokens moved one place to the left are the targets. Position t is asked for token t + 1, "
             f"which the causal mask hides from it, so one window gives {cfg.block_size} predictions to learn from at "
             "once; that one extra token is why a window is one longer than the context. The start of a window of "
             "your val text, as the training cut it:"),
        Tokens([(token_text(run.tokenizer, i), i) for i in shown], frozenset({run.eot_id})),
        Table(("position t", "the input up to t", "target: token t + 1", "p(target), final model",
               "loss −ln p (nats)"), objective_rows(run.tokenizer, objective, SHOWN_POSITIONS)),
        Text(f"The loss at a position is the cross-entropy −ln p, where p is the probability the model gave the "
             f"target: 0 when it gave the right token probability 1, {nats(0.5):.2f} at probability one half, and "
             "without bound as p goes to 0. Training minimises its mean over every position of every window of a "
             f"step; over this whole window of {cfg.block_size} positions the final model's mean is "
             f"{objective.final_loss:.3f} nats. A model that knows nothing gives every token the same probability "
             f"1/{cfg.vocab_size:,}: its loss is ln {cfg.vocab_size:,} = {uniform:.3f} nats at every position, the "
             f"uniform guess drawn across the loss figure below. The weights training started from (`train.seed`) "
             f"score {objective.initial_loss:.3f} on this window."),
        Text(bits_text(run.eval_metrics, run.train_metrics)),
    ]


# --- 7. training: the run ------------------------------------------------------------------------------------

LR_LABELS = {"adamw": "train.lr (AdamW)", "muon": "train.muon_lr (Muon)"}  # by llm.optim.peak_lrs' names


def lr_curves(cfg: TrainConfig) -> list[tuple[str, list[int], list[float], str]]:
    """(label, steps, lrs, style) of each optimizer: its lr at every step (1-based, as the history counts
    them), by the training's own schedule and the rule set_lr applies (llm.optim.group_lrs)."""
    per_step = [group_lrs(step, cfg) for step in range(cfg.max_steps)]
    steps = list(range(1, cfg.max_steps + 1))
    return [(LR_LABELS[name], steps, [lrs[name] for lrs in per_step], "-") for name in peak_lrs(cfg)]


def training_plot(history: list[HistoryRow], cfg: TrainConfig, vocab_size: int) -> plt.Figure:
    """The chapter's figure (run_figures.training_figure) from the history and the schedule; each lr curve is
    named by its optimizer alone (the caption names the params)."""
    val = [r for r in history if r.val_loss is not None]
    steps = [r.step for r in history]
    return training_figure(
        ([r.tokens_seen for r in history], [r.train_loss for r in history]),
        ([r.tokens_seen for r in val], [r.val_loss for r in val]), vocab_size,
        [(label.split(" (")[-1].rstrip(")"), s, lrs) for label, s, lrs, _ in lr_curves(cfg)], cfg.warmup_steps,
        (steps, [r.grad_norm for r in history]), cfg.grad_clip, (steps, [r.tokens_per_sec for r in history]))


def evaluated_rows(history: list[HistoryRow]) -> list[HistoryRow]:
    """The history's rows with a val loss and a train loss to compare it with."""
    return [r for r in history if r.val_loss is not None and math.isfinite(r.val_loss) and math.isfinite(r.train_loss)]


def gap_text(history: list[HistoryRow], passes: float) -> str | None:
    """The train/val gap at the last evaluation, how it changed since the first, and why a gap opens; None
    where the run never evaluated."""
    rows = evaluated_rows(history)
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    gap, first_gap = last.val_loss - last.train_loss, first.val_loss - first.train_loss
    text = (f"The gap between the curves. At step {last.step:,} the val loss was {last.val_loss:.3f} nats and the "
            f"train loss {last.train_loss:.3f}: a gap of {gap:.3f} nats")
    if len(rows) > 1:
        change = ("grew" if gap > first_gap + 0.01 else "shrank" if gap < first_gap - 0.01
                  else "stayed about the same")
        text += f", which {change} from {first_gap:.3f} at the first evaluation (step {first.step:,})"
    covered = 1 - math.exp(-passes)
    return text + (
        ". The val batches are text the model never learns from. Each train batch is scored just before the model "
        "learns from it, but its windows are drawn at random from the train split: after "
        f"{passes:.2f} passes' worth of them, about 1 − e^−{passes:.2f} = {covered:.0%} of the train text had been "
        "in an earlier batch, and a model predicts text it has learned from better than new text. A gap that widens "
        "as the passes grow is overfitting beginning: the model learning these documents rather than what carries "
        "over to others. Part of a gap can also be the split itself: the val documents, held out whole "
        "(`data.val_fraction`), may simply be harder text. The val loss, never the train loss, is the measure of "
        "how well the model predicts text it has not seen.")


def optimizer_text(cfg: TrainConfig, history: list[HistoryRow]) -> list[Text]:
    """Warmup, cosine decay, AdamW, Muon and clipping, a sentence each, and which of them this run used."""
    used = (f"This run used Muon for the matrices inside the blocks (peak `train.muon_lr` = {cfg.muon_lr}) and "
            f"AdamW for the embedding, the head and the norms (peak `train.lr` = {cfg.lr}), on one schedule."
            if cfg.optimizer == "muon" else
            f"This run used AdamW for every weight (peak `train.lr` = {cfg.lr}; `train.optimizer: adamw`, Muon off).")
    clipped = sum(r.grad_norm > cfg.grad_clip for r in history)
    clipping = (f"Before each step a gradient whose norm exceeds `train.grad_clip` = {cfg.grad_clip} is scaled down "
                f"to it (the dashed line), so one unlucky batch cannot throw the weights far: of the {len(history)} "
                f"logged steps (the last of each logged interval), {clipped} were clipped." if cfg.grad_clip > 0 else
                "Gradient clipping was off (`train.grad_clip: 0`).")
    return [Text(
        "How each step moves the weights. The gradient of the loss says for every weight which way, and how "
        "steeply, the loss rises; the optimizer steps the other way, by an amount the learning rate scales. "
        f"Warmup: for the first `train.warmup_steps` = {cfg.warmup_steps} steps the learning rate rises in a "
        "straight line to its peak, because the first gradients of random weights point in unreliable directions "
        "and the optimizer's running averages of them are still empty. Cosine decay: from the peak it falls along "
        f"half a cosine to `train.min_lr` = {cfg.min_lr} at the last step, {cfg.max_steps:,}: large steps early "
        "cover ground, small steps late settle into a low point instead of bouncing around it. AdamW divides each "
        "weight's step by a running average of the size of its recent gradients, so every weight moves at about "
        "the learning rate whatever the scale of its gradient, and it pulls weights slightly towards zero each step "
        f"(`train.weight_decay` = {cfg.weight_decay}). Muon instead orthogonalises a weight matrix's momentum (a "
        "few Newton-Schulz iterations) before the step, so the update moves the matrix equally in every direction, "
        "rare ones as much as common ones; it is made for the matrices inside the blocks. " + used),
        Text(clipping)]


def speed_text(metrics: dict[str, Any]) -> str:
    text = (f"It trained at {metrics['tokens_per_sec']:,.0f} tokens per second, in {metrics['dtype']}. The model "
            f"FLOPs utilisation (MFU) is the share of the machine's peak arithmetic that speed amounts to: "
            f"{100 * metrics['mfu']:.1f} % of {metrics['peak_flops'] / 1e9:,.0f} GFLOP/s "
            f"({metrics['peak_flops_source']})")
    if metrics.get("flops_per_token"):
        text += (f", the speed times the model's {metrics['flops_per_token']:,.0f} FLOPs per token over the peak. "
                 "It is the speed curve in other units, so the figure draws only the speed")
    return text + "."


# --- 7. training: memory and time ------------------------------------------------------------------------------

MEASURED_SEQUENCES = 2  # the sequences of a measured step: a batch, and cheap on any CPU
EMULATED_TOKENS = 64  # where the CPU emulates bf16 (about 100x slower than float32), its variant runs this long


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


def step_seconds(model: GPT, tokens: torch.Tensor, dtype: str, micro_steps: int = 1, repeats: int = 2) -> float:
    """Seconds of a step's forward and backward passes over `tokens` (sequences x length + 1) split into
    `micro_steps` micro-batches whose gradients add up, as gradient accumulation runs them; the fastest of
    `repeats`, after one untimed warm-up."""
    timings = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for micro in tokens.chunk(micro_steps):
            with autocast(tokens.device, dtype):
                _, loss = model(micro[:, :-1].contiguous(), micro[:, 1:].contiguous())
            (loss / micro_steps).backward()
        timings.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return min(timings[1:])


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run a training step of this model, measured against float32 on the same tokens."""

    name: str
    sequences: int  # sequences in the measured step
    length: int  # tokens per sequence
    micro_steps: int  # the step split into this many micro-batches (gradient accumulation)
    activation_bytes: int  # what one micro-batch keeps for the backward pass, at most held at once
    seconds: float  # the step's forward and backward passes
    float32_bytes: int  # a float32 step of the same tokens in one micro-batch, without checkpointing
    float32_seconds: float

    @property
    def memory_ratio(self) -> float:
        return self.activation_bytes / self.float32_bytes

    @property
    def time_ratio(self) -> float:
        return self.seconds / self.float32_seconds


def memory_and_time(run: Run) -> list[Variant]:
    """Plain float32, gradient accumulation (one sequence per micro-step), activation checkpointing and bf16
    autocast, each measured now on a copy of this model (on the CPU) over MEASURED_SEQUENCES random sequences
    of block_size tokens; where the CPU emulates bf16, the bf16 variant and its float32 reference over one
    sequence of EMULATED_TOKENS, lest the guide wait minutes for the emulation."""
    cfg = run.model.config
    tokens = torch.randint(0, cfg.vocab_size, (MEASURED_SEQUENCES, cfg.block_size + 1),
                           generator=torch.Generator().manual_seed(0))

    def copy(checkpointed: bool = False) -> GPT:
        model = GPT(cfg)
        model.load_state_dict(run.model.state_dict())
        if checkpointed:
            apply_activation_checkpointing(model)
        return model

    def measure(name: str, model: GPT, batch: torch.Tensor, dtype: str, micro_steps: int = 1,
                reference: tuple[int, float] | None = None) -> Variant:
        micro = batch.chunk(micro_steps)[0]
        measured = (saved_activation_bytes(model, micro, dtype), step_seconds(model, batch, dtype, micro_steps))
        reference = reference or measured
        return Variant(name, batch.size(0), batch.size(1) - 1, micro_steps, *measured, *reference)

    plain = measure("float32", copy(), tokens, "float32")
    full = (plain.activation_bytes, plain.seconds)
    bf16_tokens = tokens if has_fast_bf16(torch.device("cpu")) else tokens[:1, :EMULATED_TOKENS + 1]
    short = full if bf16_tokens is tokens else (saved_activation_bytes(copy(), bf16_tokens, "float32"),
                                                step_seconds(copy(), bf16_tokens, "float32"))
    return [plain,
            measure("float32, gradient accumulation", copy(), tokens, "float32", MEASURED_SEQUENCES, full),
            measure("float32, activation checkpointing", copy(checkpointed=True), tokens, "float32", 1, full),
            measure("bf16 autocast", copy(), bf16_tokens, "bfloat16", 1, short)]


def variant_rows(variants: list[Variant]) -> list[tuple[str, ...]]:
    return [(v.name, f"{v.sequences} x {v.length} tokens" + (f", {v.micro_steps} micro-steps" if v.micro_steps > 1
                                                           else ""),
             f"{v.activation_bytes / 1e6:,.2f} MB", f"{v.memory_ratio:.2f}x", f"{v.seconds * 1e3:,.1f} ms",
             f"{v.time_ratio:.2f}x") for v in variants]


SAME_TIME = 0.05  # a ratio within this of 1 is called the same time: two timed steps on a CPU vary by that much


def speed_word(ratio: float) -> str:
    """faster, slower, or about the same: how a time ratio against float32 reads, with SAME_TIME's margin."""
    return "about the same" if abs(ratio - 1) <= SAME_TIME else "faster" if ratio < 1 else "slower"


def faster_or_slower(ratio: float) -> str:
    return f"{ratio:.2f}x the time of float32 ({speed_word(ratio)})"


def bf16_text(bf16: Variant, fast_bf16: bool, trained_dtype: str) -> str:
    """What bf16 did here, from the measured times: faster or slower is the table's ratio, emulated or not the
    CPU's flags (llm.train.has_fast_bf16)."""
    units = ("This CPU has bf16 units (AVX-512 BF16 or AMX)" if fast_bf16 else
             "This CPU has no bf16 units (neither AVX-512 BF16 nor AMX): torch emulates bf16 in software here")
    if speed_word(bf16.time_ratio) != "slower":
        verdict = f"and bf16 autocast took {faster_or_slower(bf16.time_ratio)}"
    elif fast_bf16:
        verdict = (f"yet bf16 autocast took {faster_or_slower(bf16.time_ratio)}: at this model's size the casts to "
                   "and from bf16 cost more than the faster multiplications save")
    else:
        verdict = (f"so bf16 autocast took {faster_or_slower(bf16.time_ratio)}, measured on {bf16.sequences} "
                   f"sequence of {bf16.length} tokens to keep the wait short")
    return (f"bf16 autocast runs the matrix multiplications in bfloat16, 16-bit numbers with float32's range and "
            f"fewer digits, while the weights and the optimizer stay float32: it kept {bf16.memory_ratio:.2f}x the "
            f"activations of float32 (what the multiplications save is bf16, half the size, but autocast also keeps "
            f"bf16 copies of the weights, and the norms, the softmax and the loss stay float32). {units}, "
            f"{verdict}. GPUs with tensor cores multiply bf16 much faster than float32, which makes it their usual "
            f"choice; `train.dtype: auto` chose {trained_dtype} for this run.")


def memory_blocks(run: Run) -> list:
    cfg, model_cfg = run.settings.train, run.model.config
    variants = memory_and_time(run)
    _, accumulation, checkpointing, bf16 = variants
    per_sequence = accumulation.activation_bytes  # one sequence per micro-step
    halved = (f" At `train.batch_size` = {cfg.batch_size // 2} and `train.grad_accum_steps` = "
              f"{cfg.grad_accum_steps * 2} it would train on the same tokens per step with half that."
              if cfg.batch_size % 2 == 0 else "")
    return [
        Text(f"Memory and time. A training step keeps, for the backward pass, the activations of every layer: "
             f"memory that grows with the sequences of a micro-batch, unlike the weights. Three settings trade it "
             f"against time. Measured now on a copy of this model on this machine's CPU (random tokens, "
             f"{MEASURED_SEQUENCES} sequences of {model_cfg.block_size}):"),
        Table(("variant", "tokens of the step", "activations kept", "vs float32", "forward + backward",
               "vs float32"), variant_rows(variants)),
        Text(f"Gradient accumulation runs a step's sequences as several micro-batches and adds their gradients "
             f"before the optimizer steps (`train.grad_accum_steps`): the step learns from the same tokens, while "
             f"memory holds one micro-batch's activations at a time. Here {accumulation.micro_steps} micro-steps of "
             f"one sequence kept {accumulation.memory_ratio:.2f}x the activations and took "
             f"{faster_or_slower(accumulation.time_ratio)}. This run's micro-batch of `train.batch_size` = "
             f"{cfg.batch_size} sequences keeps about {cfg.batch_size * per_sequence / 1e6:,.0f} MB in float32."
             + halved),
        Text(f"Activation checkpointing (`train.activation_checkpointing`) keeps only each block's input and "
             f"recomputes the rest of the block during the backward pass: here it kept "
             f"{checkpointing.memory_ratio:.2f}x the activations and took {faster_or_slower(checkpointing.time_ratio)}"
             ": it runs each block's forward pass twice, which costs more the larger the model and the batch."),
        Text(bf16_text(bf16, has_fast_bf16(torch.device("cpu")), run.train_metrics["dtype"])),
    ]


def training_exercises(cfg: TrainConfig, passes: float) -> list[Exercise]:
    other = "adamw" if cfg.optimizer == "muon" else "muon"
    curves = "one curve instead of two" if other == "adamw" else "two curves instead of one"
    return [
        Exercise(f"dvc exp run -S train.max_steps={2 * cfg.max_steps}",
                 "the loss figure and the gap sentence of this chapter, and the run's val bits per byte in the "
                 "experiments chapter",
                 f"Both losses lower than now, and the train loss falling further than the val loss: twice the steps "
                 f"is {2 * passes:.2f} passes over the train split instead of {passes:.2f}, so more of each batch "
                 "is text the model has already learned from, and the gap widens.",
                 (("train.max_steps", str(2 * cfg.max_steps)),)),
        Exercise(f"dvc exp run -S train.optimizer={other}",
                 f"the learning-rate panel ({curves}) and the run's val bits per byte beside this run's in the "
                 "experiments chapter",
                 ("AdamW alone, at `train.lr` for every weight: the matrices lose Muon's orthogonalised steps, and "
                  "the val loss ends higher for the same steps (in this project's benchmarks, docs/benchmarks.md, "
                  "Muon was the largest single gain)." if other == "adamw" else
                  "Muon for the matrices inside the blocks at `train.muon_lr`, AdamW for the rest: a lower val loss "
                  "for the same steps (in this project's benchmarks, docs/benchmarks.md, Muon was the largest "
                  "single gain)."),
                 (("train.optimizer", other),)),
    ]


def training_chapter(run: Run, figure_dir: Path) -> Chapter:
    cfg, metrics = run.settings.train, run.train_metrics
    model_cfg = run.model.config
    tokens_per_step = metrics["tokens_seen"] // max(metrics["steps"], 1)
    world = tokens_per_step // (cfg.batch_size * cfg.grad_accum_steps * model_cfg.block_size)
    passes = metrics["tokens_seen"] / run.meta.splits["train"].tokens
    save_figure(training_plot(run.history, cfg, model_cfg.vocab_size), figure_dir / "training.png")
    gap = gap_text(run.history, passes)
    return Chapter("training", "Training", [
        *objective_blocks(run),
        Text(f"Training ran {metrics['steps']:,} steps of {tokens_per_step:,} tokens each "
             f"({cfg.batch_size} sequences x {cfg.grad_accum_steps} accumulation micro-steps x {world} "
             f"process{'es' if world > 1 else ''} x {model_cfg.block_size} tokens): {metrics['tokens_seen']:,} "
             f"tokens, {passes:.2f} passes over the train split. It ended at train loss {metrics['train_loss']:.3f} "
             f"and val loss {metrics['val_loss']:.3f} nats per token; the evaluate stage, scoring every val token, "
             f"measured {run.eval_metrics['val_bpb']:.4f} bits per byte."),
        Figure("figures/training.png", "Top: the loss against tokens seen, in nats (left) and bits (right), with the "
                                       "loss of a uniform guess. Below, by step: the learning rate of each "
                                       "optimizer (warmup shaded), the gradient norm before clipping and the "
                                       "speed."),
        *([Text(gap)] if gap else []),
        *optimizer_text(cfg, run.history),
        Text(speed_text(metrics)),
        *memory_blocks(run),
        *training_exercises(cfg, passes),
    ])


# --- 8. generation -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingStep:
    """The next token's distribution after one step of sampling, as llm.generate.sample takes them."""

    title: str
    probs: torch.Tensor  # (V,) after this step
    kept: torch.Tensor  # (V,) bool: the tokens that can still be drawn (a filter sets the others' logits to -inf)
    removed: torch.Tensor  # (V,) bool: the tokens this step took out
    before: torch.Tensor  # (V,) the probabilities the step started from


def sampling_path(model: GPT, ids: list[int], temperature: float, top_k: int, top_p: float) -> list[SamplingStep]:
    """The model's softmax after `ids`, then each step llm.generate.sample applies: the temperature, then top-k,
    then top-p (llm.generate.filter_logits); at temperature 0, greedy: the top token, nothing drawn."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[-model.config.block_size:]]))
    logits = logits[0, -1].float()
    softmax = logits.softmax(-1)
    everything = torch.ones_like(softmax, dtype=torch.bool)
    steps = [SamplingStep("the model's softmax", softmax, everything, ~everything, softmax)]
    scaled = logits / temperature if temperature != 0 else None
    if scaled is None or not torch.isfinite(scaled).all():  # greedy, as sample() decides it
        top = torch.zeros_like(everything).scatter(0, logits.argmax()[None], True)
        return [*steps, SamplingStep("temperature 0 (greedy)", top.float(), top, ~top, softmax)]
    tempered = scaled.softmax(-1)
    after_k = filter_logits(scaled, top_k, 1.0)
    after_p = filter_logits(scaled, top_k, top_p)  # top-k first, as sample() applies them
    kept_k, kept_p = ~torch.isneginf(after_k), ~torch.isneginf(after_p)
    return [*steps, SamplingStep(f"temperature {temperature}", tempered, everything, ~everything, softmax),
            SamplingStep(f"top-k {top_k}" if top_k else "top-k off", after_k.softmax(-1), kept_k, ~kept_k, tempered),
            SamplingStep(f"top-p {top_p}" if top_p < 1 else "top-p off", after_p.softmax(-1), kept_p,
                         kept_k & ~kept_p, after_k.softmax(-1))]


def step_note(index: int, step: SamplingStep) -> str:
    """The note on a step's panel: what it removed and what is left."""
    removed, left = int(step.removed.sum()), int(step.kept.sum())
    if index == 0:
        return f"all {left:,} tokens"
    if index == 1 and not removed:
        return "reshaped: none removed"
    return f"removed {removed:,}, {left:,} left" if removed else f"none removed, {left:,} left"


def sampling_plot(steps: list[SamplingStep], labels: list[str], shown: list[int]) -> plt.Figure:
    """The chapter's figure (run_figures.sampling_figure): the `shown` tokens (`labels`) at every step."""
    return sampling_figure([(s.title, s.probs[shown].numpy(), s.removed[shown].numpy(), s.before[shown].numpy(),
                             step_note(i, s)) for i, s in enumerate(steps)], labels)


def sampling_steps(temperature: float, top_k: int, top_p: float, counts: list[int], top_share: float) -> str:
    """What each sampling setting did to the distribution, in words (`counts`: tokens left after each step:
    softmax, temperature, top-k, top-p; at temperature 0 the greedy pick ends it)."""
    if temperature == 0:
        k = "top-k is off" if not top_k else f"top-k ({top_k}) changes nothing"
        p = "top-p is off" if top_p >= 1 else f"top-p ({top_p}) changes nothing"
        return ("Temperature 0 is greedy: the most likely token is taken and nothing is drawn, so every other token "
                f"is left out (the bars show the distribution it is taken from); {k} and {p}.")
    effect = "sharpens" if temperature < 1 else "flattens" if temperature > 1 else "leaves"
    scaled = (f"dividing the logits by the temperature {temperature} {effect} it (the top token now has "
              f"{top_share:.3f}) and removes no token")
    removed_k, removed_p = counts[1] - counts[2], counts[2] - counts[3]
    k = (f"top-k keeps the {top_k} most likely tokens and removes "
         f"{f'the other {removed_k:,}' if removed_k else 'none'} ({counts[2]:,} left of {counts[1]:,})" if top_k
         else "top-k is off (`evaluate.top_k: 0`)")
    p = (f"top-p keeps the fewest tokens whose probability reaches {top_p} and removes "
         f"{f'{removed_p:,} more' if removed_p else 'none'} ({counts[3]:,} left)" if top_p < 1
         else "top-p is off (`evaluate.top_p: 1.0`)")
    text = f"{scaled}; {k}; {p}."
    return text[0].upper() + text[1:]


def generation_exercises(cfg: EvaluateConfig, removed: int) -> list[Exercise]:
    return [
        Exercise("dvc exp run -S evaluate.temperature=0",
                 "the samples at the end of this chapter (reports/samples.md)",
                 "Greedy text: the most likely token every time, the same whatever the seed, and before long the "
                 "same phrase over and over, since a loop of likely tokens makes itself likelier.",
                 (("evaluate.temperature", "0"),)),
        Exercise("dvc exp run -S evaluate.temperature=1.0 -S evaluate.top_k=0 -S evaluate.top_p=1.0",
                 "the samples, and the next-token figure: no token greyed out",
                 f"Sampling from the model's own softmax, tail included: the {removed:,} unlikely tokens the filters "
                 "removed above can now be drawn, and the text has more invented words and broken names than with "
                 f"the defaults (temperature {cfg.temperature}, top-k {cfg.top_k}, top-p {cfg.top_p}).",
                 (("evaluate.temperature", "1.0"), ("evaluate.top_k", "0"), ("evaluate.top_p", "1.0"))),
    ]


SHOWN_TOKENS = (15, 20)  # the most likely tokens the figure shows: at least, at most (it fits an A4 page)


def generation_chapter(run: Run, figure_dir: Path) -> Chapter:
    cfg = run.settings.evaluate
    prompt = cfg.prompts[0]
    ids = prompt_ids(run.tokenizer, prompt, run.eot_id)
    steps = sampling_path(run.model, ids, cfg.temperature, cfg.top_k, cfg.top_p)
    counts = [int(s.kept.sum()) for s in steps]
    # as many tokens as the filters leave, and a few they remove, within SHOWN_TOKENS
    count = min(max(counts[-1] + 5, SHOWN_TOKENS[0]), SHOWN_TOKENS[1], len(steps[0].probs))
    shown = torch.argsort(steps[0].probs, descending=True)[:count].tolist()
    labels = [repr(token_text(run.tokenizer, i)) for i in shown]
    save_figure(sampling_plot(steps, labels, shown), figure_dir / "next_token.png")
    top = shown[0]
    removed = sum(int(s.removed.sum()) for s in steps)
    blocks: list = [
        Text(f"Generation feeds the model its own output, one token at a time. After the prompt "
             f"{literal(repr(prompt))} ({len(ids)} tokens), the model gives a probability to each of the "
             f"{run.model.config.vocab_size:,} tokens; the most likely next token is {labels[0]} at "
             f"{float(steps[0].probs[top]):.3f}. Sampling then transforms the distribution, as "
             f"`evaluate.temperature`, `evaluate.top_k` and `evaluate.top_p` say:"),
        Text(sampling_steps(cfg.temperature, cfg.top_k, cfg.top_p, counts + [counts[-1]] * (4 - len(counts)),
                            float(steps[1].probs[top]))
             + " One token is drawn from what remains, with the sample's seeded generator, so the same seed "
               "writes the same text."),
        Figure("figures/next_token.png", f"The probability of the {count} most likely next tokens as each step of "
                                         "sampling leaves it, all panels on one scale; grey: a token the step "
                                         "removes, at the probability it had before. The note on each panel counts "
                                         "the tokens removed and left out of the whole vocabulary."),
        Text(f"The samples of the evaluate stage (reports/samples.md): each prompt of `evaluate.prompts` sampled "
             f"with its own seed, up to {cfg.max_new_tokens} new tokens. The prompt is in bold; the rest the model "
             "wrote."),
    ]
    for sample in read_samples(run.samples):
        blocks += [Text(f"{literal(sample.title)} (seed {sample.seed})"),
                   Pre(sample.prompt + sample.continuation, prompt_chars=len(sample.prompt))]
    return Chapter("generation", "Generation", blocks + generation_exercises(cfg, removed))
