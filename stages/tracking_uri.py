from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params


@stage
def tracking_uri(params: Path = PARAMS) -> None:
    """Print mlflow.tracking_uri as the stages use it (a relative SQLite path made absolute): `make ui`."""
    from llm.configs.mlflow import MlflowConfig
    from llm.project import project_root
    from llm.tracking import resolve_tracking_uri

    typer.echo(resolve_tracking_uri(load_params(params, mlflow=MlflowConfig).mlflow.tracking_uri, project_root()))
