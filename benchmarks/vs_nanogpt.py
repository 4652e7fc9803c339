"""Side by side with nanoGPT on this machine: step speed at one shape, and val bits per byte after the same
training wall-clock.

    python benchmarks/vs_nanogpt.py --nanogpt ~/src/nanoGPT speed --n-layer 6 --n-head 6 --n-embd 384 --dtype bfloat16
    python benchmarks/vs_nanogpt.py --nanogpt ~/src/nanoGPT bpb --minutes 5

nanoGPT (github.com/karpathy/nanoGPT) is not a dependency and none of its code is in this project: give the
path of a checkout, and its `model.py` is imported from there.

speed  Our GPT and nanoGPT's at the same shape, vocabulary, block and batch (our `--arch`, default gpt2, which
       is nanoGPT's architecture), each with its own AdamW set-up (and ours with `--optimizer`), one full
       optimizer step per iteration, alternated for `--rounds` rounds so that both see the machine's same
       moods. Prints each one's best tokens/s and the ratio.
bpb    nanoGPT's CPU recipe from its README (character-level, 4 layers x 4 heads x 128, block 64, batch 12,
       no dropout, lr 1e-3 to 1e-4, beta2 0.99, 100 warmup iterations) trained on our clean train split as
       characters for `--minutes` of wall-clock (its iteration count set to what fits, so its schedule ends
       with the budget), then scored on every character of the val split, in bits per UTF-8 byte: the figure
       to put beside our evaluate stage's `val_bpb` for the same budget (benchmarks/learning_per_minute.py).
"""

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from model_args import add_model_args, model_config, optimizer_step

from llm.configs.data import DataConfig
from llm.configs.train import TrainConfig
from llm.documents import iter_documents
from llm.model import GPT
from llm.optim import configure_optimizers
from llm.split import is_val
from stages.params import load_params


def import_nanogpt(checkout: Path):
    path = checkout / "model.py"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; --nanogpt takes a nanoGPT checkout")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_seconds(step, steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def speed(args: argparse.Namespace, nanogpt) -> None:
    torch.manual_seed(0)
    cfg = model_config(args)
    ours = GPT(cfg)
    our_optimizers = configure_optimizers(ours, TrainConfig(optimizer=args.optimizer, dtype=args.dtype),
                                          torch.device("cpu"))
    theirs = nanogpt.GPT(nanogpt.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                                           n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=True))
    their_optimizer = theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size))

    tokens = args.batch_size * cfg.block_size
    best = {"ours": 0.0, "nanoGPT": 0.0}

    def ours_step() -> None:
        optimizer_step(ours, our_optimizers, x, x, args.dtype)

    def their_step() -> None:
        optimizer_step(theirs, [their_optimizer], x, x, args.dtype)

    for _ in range(args.rounds):
        best["ours"] = max(best["ours"], tokens / step_seconds(ours_step, args.steps))
        best["nanoGPT"] = max(best["nanoGPT"], tokens / step_seconds(their_step, args.steps))
    print(f"{cfg.n_layer}x{cfg.n_embd} block {cfg.block_size} vocab {cfg.vocab_size} batch {args.batch_size} "
          f"{args.dtype}, best of {args.rounds} alternated rounds of {args.steps} steps, torch threads "
          f"{torch.get_num_threads()}: ours ({cfg.arch}, {args.optimizer}) {best['ours']:,.0f} tokens/s, nanoGPT "
          f"{best['nanoGPT']:,.0f} tokens/s: {best['ours'] / best['nanoGPT']:.2f}x")


def split_text(clean_dir: Path, params: Path) -> tuple[str, str]:
    """The train and val documents of the clean stage's output, split as the tokenize stage splits them,
    each document followed by a newline."""
    data = load_params(params, data=DataConfig).data
    parts: dict[bool, list[str]] = {False: [], True: []}
    for doc_id, text in iter_documents(clean_dir):
        parts[is_val(doc_id, data.seed, data.val_fraction)].append(text + "\n")
    return "".join(parts[False]), "".join(parts[True])


def bpb(args: argparse.Namespace, nanogpt) -> None:
    train_text, val_text = split_text(args.clean, args.params)
    chars = sorted(set(train_text))
    index = {c: i for i, c in enumerate(chars)}
    unknown = len(chars)  # val characters never seen in training share one extra id
    train_ids = torch.tensor([index[c] for c in train_text], dtype=torch.long)
    val_ids = np.array([index.get(c, unknown) for c in val_text], dtype=np.int64)
    unseen = int((val_ids == unknown).sum())
    block, batch, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100
    config = nanogpt.GPTConfig(block_size=block, vocab_size=len(chars) + 1, n_layer=4, n_head=4, n_embd=128,
                               dropout=0.0, bias=False)

    def fresh() -> tuple:
        torch.manual_seed(1337)
        model = nanogpt.GPT(config)
        return model, model.configure_optimizers(0.1, lr, (0.9, 0.99), "cpu"), torch.Generator().manual_seed(1337)

    model, optimizer, generator = fresh()

    def train_step(it: int, iters: int) -> None:
        if it < warmup:
            rate = lr * (it + 1) / (warmup + 1)
        else:
            rate = min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, iters - warmup)))) * (
                lr - min_lr)
        for group in optimizer.param_groups:
            group["lr"] = rate
        starts = torch.randint(len(train_ids) - block - 1, (batch,), generator=generator)
        x = torch.stack([train_ids[s:s + block] for s in starts])
        y = torch.stack([train_ids[s + 1:s + block + 1] for s in starts])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    probe = 20
    start = time.perf_counter()
    for it in range(probe):
        train_step(it, 10**9)
    iters = int(args.minutes * 60 / ((time.perf_counter() - start) / probe))
    model, optimizer, generator = fresh()  # the timed run starts afresh; train_step sees the new ones
    start = time.perf_counter()
    for it in range(iters):
        train_step(it, iters)
    train_seconds = time.perf_counter() - start

    model.eval()
    nats, targets = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(val_ids) - 1, block * 64):  # 64 windows of block + 1 characters at a time
            rows = [val_ids[s:s + block + 1] for s in range(first, min(first + block * 64, len(val_ids) - 1), block)]
            for length in sorted({len(r) for r in rows}):
                same = torch.from_numpy(np.stack([r for r in rows if len(r) == length]))
                logits, _ = model(same[:, :-1], same[:, 1:].contiguous())  # targets: logits at every position
                nats += F.cross_entropy(logits.flatten(0, 1), same[:, 1:].flatten(), reduction="sum").item()
                targets += same[:, 1:].numel()
    val_bytes = len(val_text[1:].encode())  # every character but the first is a target once
    print(f"nanoGPT char-level 4x128 block 64 batch 12, {len(chars)} characters, {iters} iterations in "
          f"{train_seconds / 60:.2f} min (budget {args.minutes} min), {iters * batch * block / train_seconds:,.0f} "
          f"chars/s: val {nats / targets:.4f} nats/char over {targets:,} characters ({unseen} unseen in training), "
          f"val bpb {nats / math.log(2) / val_bytes:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (its model.py is imported)")
    commands = parser.add_subparsers(dest="command", required=True)
    speed_parser = commands.add_parser("speed")
    add_model_args(speed_parser, n_layer=6, n_head=6, n_embd=384)
    speed_parser.add_argument("--batch-size", type=int, default=16)
    speed_parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    speed_parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    speed_parser.add_argument("--steps", type=int, default=4)
    speed_parser.add_argument("--rounds", type=int, default=3)
    bpb_parser = commands.add_parser("bpb")
    bpb_parser.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget")
    bpb_parser.add_argument("--clean", type=Path, default=Path("data/clean"))
    bpb_parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="for data.seed, val_fraction")
    args = parser.parse_args()
    nanogpt = import_nanogpt(args.nanogpt.expanduser())
    (speed if args.command == "speed" else bpb)(args, nanogpt)


if __name__ == "__main__":
    sys.exit(main())
