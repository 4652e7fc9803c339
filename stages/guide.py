from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params


@stage
def guide(
    params: Path = PARAMS,
    raw: Path = typer.Option(Path("data/raw"), help="the fetched corpus"),
    clean_metrics: Path = typer.Option(Path("metrics/clean.json"), help="what clean kept and dropped"),
    tokenizer_metrics: Path = typer.Option(Path("metrics/tokenizer.json"), help="the tokenizer's report"),
    tokens: Path = typer.Option(Path("data/tokens"), help="token shards and meta.json"),
    model_dir: Path = typer.Option(Path("models/final"), "--model", help="the trained model folder"),
    train_metrics: Path = typer.Option(Path("metrics/train.json"), help="the training's metrics"),
    train_plots: Path = typer.Option(Path("plots/train.csv"), help="the training's history"),
    attention: Path = typer.Option(Path("plots/attention.safetensors"), help="attention recorded in training"),
    eval_metrics: Path = typer.Option(Path("metrics/eval.json"), help="the evaluation's metrics"),
    samples: Path = typer.Option(Path("reports/samples.md"), help="the evaluation's samples"),
    clean: Path = typer.Option(Path("data/clean"), help="the cleaned corpus the sft stage's questions come from"),
    sft_model: Path = typer.Option(Path("models/sft"), help="the instruction-tuned model folder"),
    sft_metrics: Path = typer.Option(Path("metrics/sft.json"), help="the tuning's task accuracy (absent: the "
                                                                   "chapter says how to run the sft stage)"),
    sft_plots: Path = typer.Option(Path("plots/sft.csv"), help="the tuning's history"),
    out: Path = typer.Option(Path("reports/guide"), help="index.html, guide.pdf, attention_evolution.gif, "
                                                         "figures/ (replaced whole)"),
) -> None:
    """Build the learner's guide to this run: a chapter per stage, as HTML and one PDF, logged to the
    training's MLflow run."""
    from llm.configs.data import DataConfig
    from llm.configs.evaluate import EvaluateConfig
    from llm.configs.mlflow import MlflowConfig
    from llm.configs.sft import SFTConfig
    from llm.configs.tokenizer import TokenizerConfig
    from llm.configs.train import TrainConfig
    from llm.guide.build import build_guide
    from llm.guide.inputs import GuidePaths, GuideSettings

    cfg = load_params(params, data=DataConfig, tokenizer=TokenizerConfig, train=TrainConfig, evaluate=EvaluateConfig,
                      mlflow=MlflowConfig, sft=SFTConfig)
    paths = GuidePaths(raw, clean_metrics, tokenizer_metrics, tokens, model_dir, train_metrics, train_plots,
                       attention, eval_metrics, samples, out, clean, sft_model, sft_metrics, sft_plots)
    build_guide(paths, GuideSettings(cfg.data, cfg.tokenizer, cfg.train, cfg.evaluate, cfg.mlflow, cfg.sft))
