import json
from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params


@stage
def evaluate(
    params: Path = PARAMS,
    model_dir: Path = typer.Option(Path("models/final"), "--model", help="trained model folder"),
    tokens: Path = typer.Option(Path("data/tokens"), help="token shards: the val split is scored"),
    checkpoints: Path = typer.Option(Path("models/checkpoints"), help="checkpoints for the attention maps"),
    train_plots: Path = typer.Option(Path("plots/train.csv"), help="the training's loss table"),
    metrics: Path = typer.Option(Path("metrics/eval.json"), help="val loss, perplexity, bits per byte"),
    reports: Path = typer.Option(Path("reports"), help="samples.md and PNG figures (reports/guide/ is left alone)"),
    text: Path | None = typer.Option(None, help="score this UTF-8 file instead: print JSON, write nothing"),
) -> None:
    """Score the model on the whole val split, write samples and attention heatmaps, and log them all to
    the training's MLflow run. With --text FILE, score that file and print one JSON object."""
    from llm.configs.evaluate import EvaluateConfig
    from llm.configs.mlflow import MlflowConfig
    from llm.configs.train import TrainConfig
    from llm.evaluate import EvalPaths, run_evaluation, score_text_file

    if text is not None:
        typer.echo(json.dumps(score_text_file(model_dir, text)))
        return
    cfg = load_params(params, train=TrainConfig, evaluate=EvaluateConfig, mlflow=MlflowConfig)
    paths = EvalPaths(model_dir, tokens, checkpoints, train_plots, metrics, reports)
    run_evaluation(cfg.evaluate, cfg.train.seed, paths, cfg.mlflow)
