"""What the benchmarks share: the model-shape options and the one optimizer step they time."""

import argparse

import torch

from llm.configs.model import ARCHS
from llm.model import GPTConfig
from llm.train import autocast


def add_model_args(parser: argparse.ArgumentParser, n_layer: int, n_head: int, n_embd: int) -> None:
    parser.add_argument("--arch", default="gpt2", choices=ARCHS)
    parser.add_argument("--n-layer", type=int, default=n_layer)
    parser.add_argument("--n-head", type=int, default=n_head)
    parser.add_argument("--n-embd", type=int, default=n_embd)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)


def model_config(args: argparse.Namespace, block_size: int | None = None) -> GPTConfig:
    return GPTConfig(arch=args.arch, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                     block_size=block_size or args.block_size, dropout=0.0, vocab_size=args.vocab_size)


def optimizer_step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], x: torch.Tensor,
                   y: torch.Tensor, dtype: str) -> None:
    """One training step as the train loop takes it: forward (autocast in `dtype`), backward, clip, update."""
    with autocast(x.device, dtype):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
