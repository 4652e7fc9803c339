"""How much a recipe learns in a wall-clock budget: val bits per byte after training for about N minutes.

    python benchmarks/learning_per_minute.py --params params.yaml --minutes 5
    python benchmarks/learning_per_minute.py --params params.yaml --steps 170   # a fixed step count instead

Reads the model and train sections of a params file and the data stages' outputs (data/tokens/ and the
tokenizer: run `dvc repro tokenize` first). It times a few steps of the recipe, sets train.max_steps to
what fits the budget (so the learning-rate schedule runs to its end, as in a real run), trains from
scratch in a temporary folder, and scores the whole val split exactly as the evaluate stage does. The probe
is short, so on a noisy machine two runs of one recipe can get steps differing by ~10 %: to compare recipes
of the same step cost, give them the same `--steps`.
Prints the step count, training time, tokens/s, MFU and val bpb. Nothing is logged to MLflow.
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from llm.configs.model import ModelConfig
from llm.configs.train import TrainConfig
from llm.distributed import default_device
from llm.evaluate import score_shards, token_byte_lengths
from llm.model import GPTConfig
from llm.shards import read_meta
from llm.tokenizer import load_tokenizer
from llm.train import train
from stages.params import load_params

PROBE_STEPS = 8  # timed after a warm-up step; the first lap also pays for start-up


def probe_steps(model_cfg: GPTConfig, cfg: TrainConfig, tokens: Path, scratch: Path, minutes: float) -> int:
    """The steps of this recipe that fit `minutes`, from the speed of a few timed steps."""
    probe = dataclasses.replace(cfg, max_steps=PROBE_STEPS, warmup_steps=1, log_interval=PROBE_STEPS // 2)
    probed = train(model_cfg, probe, tokens, scratch / "probe", default_device())
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * model_cfg.block_size
    seconds_per_step = tokens_per_step / probed.metrics["tokens_per_sec"]  # laps after the first only
    return int(minutes * 60 / seconds_per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead of probing the budget")
    parser.add_argument("--tokens", type=Path, default=Path("data/tokens"))
    parser.add_argument("--tokenizer", type=Path, default=Path("models/tokenizer/tokenizer.json"))
    args = parser.parse_args()

    params = load_params(args.params, model=ModelConfig, train=TrainConfig)
    meta = read_meta(args.tokens)
    meta.check_tokenizer(args.tokens, args.tokenizer)
    tokenizer = load_tokenizer(args.tokenizer)
    model_cfg = GPTConfig(**dataclasses.asdict(params.model), vocab_size=tokenizer.get_vocab_size())
    cfg = dataclasses.replace(params.train, nproc_per_node=1, eval_interval=10**9, checkpoint_interval=10**9)

    device = default_device()
    with tempfile.TemporaryDirectory() as scratch:
        steps = args.steps or probe_steps(model_cfg, cfg, args.tokens, Path(scratch), args.minutes)
        if steps <= cfg.warmup_steps:
            raise SystemExit(f"{steps} steps are not more than train.warmup_steps ({cfg.warmup_steps}): give a "
                             "larger budget")
        run_cfg = dataclasses.replace(cfg, max_steps=steps, eval_interval=steps, checkpoint_interval=steps)
        start = time.perf_counter()
        result = train(model_cfg, run_cfg, args.tokens, Path(scratch) / "run", device)
        train_seconds = time.perf_counter() - start

    score = score_shards(result.model.eval(), meta.shard_paths(args.tokens, "val"), token_byte_lengths(tokenizer))
    metrics = result.metrics
    budget = "steps given" if args.steps else f"budget {args.minutes} min"
    print(f"{args.params}: {model_cfg.arch} {model_cfg.n_layer}x{model_cfg.n_embd}, {metrics['dtype']}, "
          f"{cfg.optimizer}, {steps} steps in {train_seconds / 60:.2f} min ({budget}), "
          f"{metrics['tokens_per_sec']:,.0f} tokens/s, "
          f"MFU {100 * metrics['mfu']:.1f}% of {metrics['peak_flops'] / 1e9:,.0f} GFLOP/s "
          f"({metrics['peak_flops_source']}): val bpb {score.bpb:.4f} (loss {score.loss:.4f} over {score.tokens:,} "
          "val tokens)")


if __name__ == "__main__":
    main()
