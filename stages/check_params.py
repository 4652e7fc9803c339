from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params


@stage
def check_params(params: Path = PARAMS) -> None:
    """Validate every section of the params file at once (each stage validates only the sections it reads)."""
    from llm.configs.clean import CleanConfig
    from llm.configs.data import DataConfig
    from llm.configs.evaluate import EvaluateConfig
    from llm.configs.mlflow import MlflowConfig
    from llm.configs.model import ModelConfig
    from llm.configs.sft import SFTConfig
    from llm.configs.tokenize import TokenizeConfig
    from llm.configs.tokenizer import TokenizerConfig
    from llm.configs.train import TrainConfig

    load_params(params, data=DataConfig, clean=CleanConfig, tokenizer=TokenizerConfig, tokenize=TokenizeConfig,
                model=ModelConfig, train=TrainConfig, evaluate=EvaluateConfig, sft=SFTConfig, mlflow=MlflowConfig)
    typer.echo(f"{params}: every section is valid")
