"""`python -m stages COMMAND`: one Typer app with a command per pipeline stage."""

from stages import clean, evaluate, export_hf, fetch, generate, tokenize, tokenizer, train  # noqa: F401  (each module registers its command)
from stages.cli import app

if __name__ == "__main__":  # guarded: spawned worker processes re-import this module
    app()
