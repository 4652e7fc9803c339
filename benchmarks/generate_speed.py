"""Decoding speed with and without the KV cache: tokens/s at a number of new tokens.

    python benchmarks/generate_speed.py                       # the default params.yaml model shape
    python benchmarks/generate_speed.py --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024  # GPT-2 124M

Random weights (speed does not depend on them), greedy decoding from a one-token prompt, never stopping
early. Both paths run in the same process, alternating, best of --repeats each; the ratio is the figure.
The two token sequences are checked to be equal.
"""

import argparse
import time

import torch
from model_args import add_model_args, model_config

from llm.distributed import default_device
from llm.generate import generate
from llm.model import GPT
from llm.throughput import sync


def timed(model: GPT, new_tokens: int, use_cache: bool) -> tuple[float, list[int]]:
    sync(model.device)
    start = time.perf_counter()
    ids = list(generate(model, [0], new_tokens, use_cache=use_cache))
    sync(model.device)
    return time.perf_counter() - start, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, n_layer=4, n_head=4, n_embd=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = default_device()
    # The context must hold the prompt and every new token, so both paths see the same text.
    block_size = max(args.block_size, args.new_tokens + 1)
    cfg = model_config(args, block_size)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    print(f"{args.arch} {args.n_layer}x{args.n_embd}, {model.num_params() / 1e6:.1f} M params, block {block_size}, "
          f"{args.new_tokens} new tokens, {device.type}, {torch.get_num_threads()} threads")
    timed(model, 8, True)  # warm-up
    best = {True: float("inf"), False: float("inf")}
    outputs = {}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            seconds, outputs[use_cache] = timed(model, args.new_tokens, use_cache)
            best[use_cache] = min(best[use_cache], seconds)
    assert outputs[True] == outputs[False], "cached and uncached greedy decoding differ"
    for use_cache in (True, False):
        print(f"{'with cache' if use_cache else 'no cache':>10}: {args.new_tokens / best[use_cache]:8.1f} tokens/s "
              f"({best[use_cache]:.2f} s)")
    print(f"speed-up with the KV cache: {best[False] / best[True]:.1f}x")


if __name__ == "__main__":
    main()
