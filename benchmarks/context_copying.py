"""Whether a model copies from its context: its loss on windows of the val shards read once, and read again right
after (llm.tasks.context_copying). The figures of docs/benchmarks.md, "Why the reading tasks stay near chance".

    python benchmarks/context_copying.py --model models/final
    python benchmarks/context_copying.py --model models/sft --tokens data/tokens --windows 8 --length 100

A model with an induction head (attend to where the current token came before, predict what followed it then)
finds the second reading nearly free; the default base model does not.
"""

import argparse
from pathlib import Path

import numpy as np

from llm.model_io import load_model_dir
from llm.shards import open_shard, read_meta
from llm.tasks import context_copying


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/final"))
    parser.add_argument("--tokens", type=Path, default=Path("data/tokens"))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=100, help="tokens per window (at most half the context)")
    args = parser.parse_args()
    model, _ = load_model_dir(args.model)
    shard = read_meta(args.tokens).splits["val"].shards[0]
    ids = np.asarray(open_shard(args.tokens / shard))
    # Windows 500 tokens apart from token 1000 on: past the first document's title and cast list.
    texts = [ids[1000 + 500 * i: 1000 + 500 * i + args.length].astype(np.int64).tolist() for i in range(args.windows)]
    copying = context_copying(model, texts)
    drop = 1 - copying.second_read / copying.first_read
    print(f"{args.model}: {copying.texts} windows of {args.length} val tokens; first reading {copying.first_read:.3f}"
          f" nats/token, second {copying.second_read:.3f} ({100 * drop:.1f} % cheaper)")


if __name__ == "__main__":
    main()
