from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params


@stage
def train(
    params: Path = PARAMS,
    tokens: Path = typer.Option(Path("data/tokens"), help="token shards and meta.json"),
    tokenizer_path: Path = typer.Option(Path("models/tokenizer/tokenizer.json"), "--tokenizer", help="the tokenizer"),
    checkpoints: Path = typer.Option(Path("models/checkpoints"), help="checkpoints, kept between runs to resume"),
    out: Path = typer.Option(Path("models/final"), help="final model: config.json, model.safetensors, tokenizer.json"),
    metrics: Path = typer.Option(Path("metrics/train.json"), help="final training metrics"),
    plots: Path = typer.Option(Path("plots/train.csv"), help="loss curves: one row per log step"),
) -> None:
    """Train the transformer (launch with torchrun for several processes); resume from a compatible
    checkpoint; rank 0 writes the outputs and logs to MLflow."""
    from llm.experiment import TrainPaths, run_training

    cfg = load_params(params)
    run_training(cfg.to_dict(), cfg.model, cfg.train, cfg.mlflow,
                 TrainPaths(tokens, tokenizer_path, checkpoints, out, metrics, plots))
