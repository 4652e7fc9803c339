import logging
from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params

log = logging.getLogger(__name__)


@stage
def clean(
    params: Path = PARAMS,
    raw: Path = typer.Option(Path("data/raw"), help="raw files to clean"),
    out: Path = typer.Option(Path("data/clean"), help="Parquet shards of id, source, text (replaced whole)"),
    metrics: Path = typer.Option(Path("metrics/clean.json"), help="counts in and out, drops by reason"),
) -> None:
    """Normalise, filter and deduplicate raw documents into Parquet shards; report every drop."""
    from llm.clean import clean_corpus
    from llm.configs.clean import CleanConfig
    from llm.configs.tokenizer import TokenizerConfig
    from llm.fileio import write_json_atomic

    cfg = load_params(params, clean=CleanConfig, tokenizer=TokenizerConfig)
    stats = clean_corpus(raw, out, cfg.clean, cfg.tokenizer.special_tokens)
    write_json_atomic(metrics, stats.to_dict())
    log.info("kept %d of %d documents (%.1f of %.1f MB) in %d shards; %d duplicates, %d special tokens neutralised",
             stats.documents_out, stats.documents_in, stats.bytes_out / 1e6, stats.bytes_in / 1e6, stats.shards,
             stats.duplicates, stats.special_tokens_neutralised)
    if stats.dropped:
        log.info("dropped:\n%s", stats.report().to_string())
