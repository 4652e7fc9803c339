"""Training-step throughput: tokens/s and MFU for a model config, dtype and compile setting.

    python benchmarks/train_throughput.py --n-layer 6 --n-embd 384 --n-head 6 --block-size 256 --dtype bfloat16

Random token ids (throughput does not depend on the data); a full optimizer step per iteration
(forward, backward, clip, AdamW or Muon + AdamW). MFU = model FLOPs per token x tokens/s / peak, the peak measured
here with large matmuls in the same dtype (or a datasheet figure for known GPUs).
"""

import argparse
import time

import torch
from model_args import add_model_args, model_config, optimizer_step

from llm.config import TrainConfig
from llm.distributed import Runtime, default_device
from llm.model import GPT
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
    args = parser.parse_args()

    device = default_device()
    peak, source = peak_flops(device, args.dtype)  # before compilation starts worker processes
    cfg = model_config(args)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    train_cfg = TrainConfig(dtype=args.dtype, optimizer=args.optimizer)
    optimizers = configure_optimizers(model, train_cfg, device)
    step_model = parallelize(model, Runtime(device=device), "ddp", args.dtype, args.compile,
                             args.activation_checkpointing)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size), device=device)

    def step() -> None:
        optimizer_step(step_model, optimizers, x, y, args.dtype)

    for _ in range(3):  # warm-up (and compilation)
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_sec = args.batch_size * cfg.block_size / seconds
    mfu = model.flops_per_token() * tokens_per_sec / peak
    print(f"{cfg.arch} {cfg.n_layer}x{cfg.n_embd} block {cfg.block_size} vocab {cfg.vocab_size} "
          f"batch {args.batch_size} {args.dtype} {args.optimizer} compile={args.compile}: "
          f"{model.num_params() / 1e6:.1f}M params, "
          f"{tokens_per_sec:,.0f} tokens/s, {seconds * 1e3:.0f} ms/step, MFU {100 * mfu:.1f}% of "
          f"{peak / 1e12:.2f} TFLOP/s ({source}), torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
