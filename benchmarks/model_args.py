"""The model-shape options the benchmarks share."""

import argparse

from llm.config import ARCHS
from llm.model import GPTConfig


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
