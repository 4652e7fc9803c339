"""Training-step throughput: tokens/s and MFU for a model config, dtype and compile setting.

    python benchmarks/train_throughput.py --n-layer 6 --n-embd 384 --n-head 6 --block-size 256 --dtype bfloat16
    python benchmarks/train_throughput.py --arch modern --n-layer 3 --n-head 3 --n-embd 192 --vocab-size 4096 \
        --dtype float32 --optimizer muon --compile --vs-eager    # compiled and eager steps, alternated

Random token ids (throughput does not depend on the data); a full optimizer step per iteration
(forward, backward, clip, AdamW or Muon + AdamW). MFU = model FLOPs per token x tokens/s / peak, the peak measured
here with large matmuls in the same dtype (or a datasheet figure for known GPUs).
"""

import argparse
import time
from collections.abc import Callable

import torch
from model_args import add_model_args, model_config, optimizer_step

from llm.configs.train import TrainConfig
from llm.distributed import Runtime, default_device
from llm.model import GPT, GPTConfig
from llm.optim import configure_optimizers
from llm.parallel import parallelize
from llm.throughput import peak_flops, sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, n_layer=6, n_head=6, n_embd=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vs-eager", action="store_true",
                        help="with --compile: also time an eager copy, alternating steps, and print the ratio")
    args = parser.parse_args()
    if args.vs_eager and not args.compile:
        parser.error("--vs-eager compares against --compile: give both")

    device = default_device()
    peak, source = peak_flops(device, args.dtype)  # before compilation starts worker processes
    cfg = model_config(args)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)
    model, step = build(cfg, args, device, args.compile, x, y)
    if args.vs_eager:
        eager_model, eager_step = build(cfg, args, device, False, x, y)

    start = time.perf_counter()
    step()  # the first step waits for the compilation
    sync(device)
    first_step = time.perf_counter() - start
    for _ in range(2):  # warm-up
        step()
        if args.vs_eager:
            eager_step()
    seconds, eager_seconds = 0.0, 0.0
    for _ in range(args.steps):  # alternated, so both see the same machine (this VM's speed drifts)
        seconds += timed(step, device) / args.steps
        if args.vs_eager:
            eager_seconds += timed(eager_step, device) / args.steps
    report(model, cfg, args, args.compile, seconds, peak, source)
    if args.compile:
        print(f"first step (compilation) {first_step:.1f} s")
    if args.vs_eager:
        report(eager_model, cfg, args, False, eager_seconds, peak, source)
        print(f"compiled / eager tokens/s: {eager_seconds / seconds:.3f}x")


def build(cfg: GPTConfig, args: argparse.Namespace, device: torch.device, compile: bool, x: torch.Tensor,
          y: torch.Tensor) -> tuple[GPT, Callable[[], None]]:
    """(model, one training step of it) with the same initial weights every time it is called."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    optimizers = configure_optimizers(model, TrainConfig(dtype=args.dtype, optimizer=args.optimizer), device)
    step_model = parallelize(model, Runtime(device=device), "ddp", args.dtype, compile,
                             args.activation_checkpointing)
    return model, lambda: optimizer_step(step_model, optimizers, x, y, args.dtype)


def timed(step: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def report(model: GPT, cfg: GPTConfig, args: argparse.Namespace, compile: bool, seconds: float, peak: float,
           source: str) -> None:
    tokens_per_sec = args.batch_size * cfg.block_size / seconds
    mfu = model.flops_per_token() * tokens_per_sec / peak
    print(f"{cfg.arch} {cfg.n_layer}x{cfg.n_embd} block {cfg.block_size} vocab {cfg.vocab_size} "
          f"batch {args.batch_size} {args.dtype} {args.optimizer} compile={compile}: "
          f"{model.num_params() / 1e6:.1f}M params, "
          f"{tokens_per_sec:,.0f} tokens/s, {seconds * 1e3:.0f} ms/step, MFU {100 * mfu:.1f}% of "
          f"{peak / 1e12:.2f} TFLOP/s ({source}), torch threads {torch.get_num_threads()}")

if __name__ == "__main__":
    main()
