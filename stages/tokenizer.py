import logging
from pathlib import Path

import typer

from stages.cli import PARAMS, stage
from stages.params import load_params

log = logging.getLogger(__name__)


@stage
def tokenizer(
    params: Path = PARAMS,
    clean: Path = typer.Option(Path("data/clean"), help="cleaned Parquet shards"),
    out: Path = typer.Option(Path("models/tokenizer/tokenizer.json"), help="trained tokenizer"),
    metrics: Path = typer.Option(Path("metrics/tokenizer.json"), help="vocab size, bytes per token on val"),
) -> None:
    """Train a byte-level BPE tokenizer on the train split; measure bytes per token on the val split."""
    from llm.configs.data import DataConfig
    from llm.configs.tokenize import TokenizeConfig
    from llm.configs.tokenizer import TokenizerConfig
    from llm.documents import iter_documents
    from llm.fileio import write_json_atomic
    from llm.tokenizer import save_tokenizer, train_on_corpus

    cfg = load_params(params, data=DataConfig, tokenizer=TokenizerConfig, tokenize=TokenizeConfig)
    trained, report = train_on_corpus(lambda: iter_documents(clean), cfg.data, cfg.tokenizer,
                                      cfg.tokenize.max_piece_chars)
    save_tokenizer(trained, out)
    write_json_atomic(metrics, report)
    log.info("tokenizer: %d tokens, trained on %d of %d train documents (%d characters), %.3f bytes per token on "
             "val", report["vocab_size"], report["train_documents_used"], report["train_documents"],
             report["train_chars_used"], report["val_bytes_per_token"])
