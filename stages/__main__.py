"""`python -m stages COMMAND`: one Typer app with a command per pipeline stage.

Each command imports the library (`llm`) inside its function, so a command loads only what it runs:
`--help` and the data stages start in a fraction of a second instead of importing torch and MLflow.
"""

from stages import (  # noqa: F401  (each module registers its command)
    chat,
    check_params,
    clean,
    evaluate,
    export_hf,
    fetch,
    fetch_sft,
    generate,
    guide,
    sft,
    tokenize,
    tokenizer,
    tracking_uri,
    train,
)
from stages.cli import app

if __name__ == "__main__":  # guarded: spawned worker processes re-import this module
    app()
