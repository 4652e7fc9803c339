"""The `mlflow` section: where training and evaluation runs are tracked."""

import dataclasses
from dataclasses import InitVar

from llm.config import Validated, param


@dataclasses.dataclass(frozen=True)
class MlflowConfig(Validated):
    # a relative sqlite path is taken from the repository root
    tracking_uri: str = param("sqlite:///mlflow.db", nonempty=True)
    experiment: str = param("gpt-from-scratch", nonempty=True)  # MLflow experiment the runs go into
    section: InitVar[str] = "mlflow"  # the params section named in errors (from_mapping passes the one it read)
