import logging
from pathlib import Path

import typer

from llm.clean import iter_documents
from llm.errors import ConfigError
from llm.fileio import write_json_atomic
from llm.split import is_val
from llm.tokenizer import count_tokens, save_tokenizer, train_tokenizer
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
    cfg = load_params(params)
    split = cfg.data

    def texts(val: bool):
        return (text for doc_id, text in iter_documents(clean) if is_val(doc_id, split.seed, split.val_fraction) == val)

    trained = train_tokenizer(texts(val=False), cfg.tokenizer)
    val_tokens, val_bytes = count_tokens(trained, texts(val=True))
    if val_bytes == 0:
        raise ConfigError("data.val_fraction", "the val split has no documents; raise it, change data.seed or add data")
    save_tokenizer(trained, out)
    report = {
        "vocab_size": trained.get_vocab_size(),
        "val_tokens": val_tokens,
        "val_bytes": val_bytes,
        "val_bytes_per_token": val_bytes / val_tokens,
    }
    write_json_atomic(metrics, report)
    log.info("tokenizer: %d tokens, %.3f bytes per token on val", report["vocab_size"], report["val_bytes_per_token"])
