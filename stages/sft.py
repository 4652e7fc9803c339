from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params


@stage
def sft(
    params: Path = PARAMS,
    model: Path = typer.Option(Path("models/final"), help="the pretrained model folder to tune"),
    clean: Path = typer.Option(Path("data/clean"), help="the cleaned corpus the built-in conversations come from"),
    conversations: Path = typer.Option(Path("data/sft"), help="sft.source's conversations, brought by fetch-sft"),
    checkpoints: Path = typer.Option(Path("models/sft_checkpoints"), help="checkpoints, kept between runs to resume"),
    out: Path = typer.Option(Path("models/sft"), help="the tuned model: the same folder format as models/final/"),
    metrics: Path = typer.Option(Path("metrics/sft.json"), help="task accuracy before and after, and the training"),
    plots: Path = typer.Option(Path("plots/sft.csv"), help="the tuning's loss curves: one row per log step"),
) -> None:
    """Instruction-tune the pretrained model on conversations (the assistant's tokens trained, the rest masked),
    score the held-out tasks before and after, and log the run to MLflow, tagged with the base model's run."""
    from llm.configs.data import DataConfig
    from llm.configs.mlflow import MlflowConfig
    from llm.configs.sft import SFTConfig
    from llm.lineage import changed_params, committed_text
    from llm.sft import SFTPaths, run_sft
    from stages.params import committed_params

    cfg = load_params(params, sft=SFTConfig, data=DataConfig, mlflow=MlflowConfig)
    source = None if cfg.sft.source == "builtin" else conversations
    paths = SFTPaths(model, clean, source, checkpoints, out, metrics, plots)
    committed = committed_params(committed_text(params))
    run_sft(cfg.sft, cfg.data, cfg.mlflow, paths, cfg.to_dict(),
            changes=None if committed is None else changed_params(cfg.raw, committed))
