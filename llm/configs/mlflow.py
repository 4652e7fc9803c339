"""The `mlflow` section: where training and evaluation runs are tracked, and the registered model evaluation
promotes."""

import dataclasses
import re
from dataclasses import InitVar

from llm.config import FieldError, Validated, param

# A name that a models:/NAME@ALIAS URI can carry: no "/", "@" or ":", which the URI would read as its parts.
REGISTERED_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclasses.dataclass(frozen=True)
class MlflowConfig(Validated):
    # a relative sqlite path is taken from the repository root
    tracking_uri: str = param("sqlite:///mlflow.db", nonempty=True)
    experiment: str = param("gpt-from-scratch", nonempty=True)  # MLflow experiment the runs go into
    # the registry name evaluate registers each model under, moving the alias `champion` to the best; "" turns it off
    registered_model: str = param("shakespeare-gpt")
    section: InitVar[str] = "mlflow"  # the params section named in errors (from_mapping passes the one it read)

    def validate(self) -> None:
        if self.registered_model and not REGISTERED_MODEL_NAME.fullmatch(self.registered_model):
            raise FieldError("registered_model", "must be empty or 1 to 100 letters, digits, '.', '_' or '-' "
                             f"(starting with a letter or digit), got {self.registered_model!r}")
