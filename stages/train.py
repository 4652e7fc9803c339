from pathlib import Path

import typer

from stages.cli import PARAMS, command_line, stage
from stages.params import load_params


@stage
def train(
    ctx: typer.Context,
    params: Path = PARAMS,
    tokens: Path = typer.Option(Path("data/tokens"), help="token shards and meta.json"),
    tokenizer_path: Path = typer.Option(Path("models/tokenizer/tokenizer.json"), "--tokenizer", help="the tokenizer"),
    checkpoints: Path = typer.Option(Path("models/checkpoints"), help="checkpoints, kept between runs to resume"),
    out: Path = typer.Option(Path("models/final"), help="final model: config.json, model.safetensors, tokenizer.json"),
    metrics: Path = typer.Option(Path("metrics/train.json"), help="final training metrics"),
    plots: Path = typer.Option(Path("plots/train.csv"), help="loss curves: one row per log step"),
    attention: Path = typer.Option(Path("plots/attention.safetensors"),
                                   help="the attention on evaluate.attention_text at every evaluation"),
) -> None:
    """Train the transformer; resume from a compatible checkpoint; rank 0 writes the outputs and logs to
    MLflow. With train.nproc_per_node > 1 it starts that many worker processes itself; under torchrun
    (several machines) it runs as one worker."""
    from llm.configs.evaluate import EvaluateConfig
    from llm.configs.mlflow import MlflowConfig
    from llm.configs.model import ModelConfig
    from llm.configs.train import TrainConfig
    from llm.launch import die_with_launcher, is_worker, launch_workers
    from llm.lineage import changed_params, committed_text
    from llm.training_run import TrainPaths, read_inputs, run_training
    from stages.params import committed_params

    cfg = load_params(params, model=ModelConfig, train=TrainConfig, evaluate=EvaluateConfig, mlflow=MlflowConfig)
    paths = TrainPaths(tokens, tokenizer_path, checkpoints, out, metrics, plots, attention)
    if is_worker():
        die_with_launcher()
    elif cfg.train.nproc_per_node > 1:
        read_inputs(cfg.model, paths, cfg.evaluate.attention_text)  # checked before any worker starts
        code, message = launch_workers(cfg.train.nproc_per_node, command_line(ctx), cfg.train.max_restarts)
        if message:
            typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code)
    committed = committed_params(committed_text(params))
    run_training(cfg.to_dict(), cfg.model, cfg.train, cfg.mlflow, paths, cfg.evaluate.attention_text,
                 changes=None if committed is None else changed_params(cfg.raw, committed))
