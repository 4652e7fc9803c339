import logging
from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params

log = logging.getLogger(__name__)


@stage
def tokenize(
    params: Path = PARAMS,
    clean: Path = typer.Option(Path("data/clean"), help="cleaned Parquet shards"),
    tokenizer: Path = typer.Option(Path("models/tokenizer/tokenizer.json"), help="trained tokenizer"),
    out: Path = typer.Option(Path("data/tokens"), help="token shards and meta.json (replaced whole)"),
) -> None:
    """Encode the cleaned corpus into llm.c-layout train/val token shards."""
    from llm.configs.data import DataConfig
    from llm.configs.tokenize import TokenizeConfig
    from llm.tokenize import tokenize_corpus

    cfg = load_params(params, data=DataConfig, tokenize=TokenizeConfig)
    meta = tokenize_corpus(clean, tokenizer, out, cfg.data, cfg.tokenize)
    for split, counts in meta.splits.items():
        log.info("%s: %d documents, %d tokens, %d shards (%s)", split, counts.documents, counts.tokens,
                 len(counts.shards), meta.dtype)
