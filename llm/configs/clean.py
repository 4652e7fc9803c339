"""The `clean` section: how raw documents are filtered, deduplicated and sharded."""

import dataclasses
from dataclasses import InitVar

from llm.config import Engine, Validated, check_engine, param


@dataclasses.dataclass(frozen=True)
class CleanConfig(Validated):
    min_chars: int = param(64, ge=0)  # documents shorter than this after cleaning are dropped
    shard_mb: int = param(128, ge=1)  # UTF-8 megabytes of text per Parquet shard in data/clean/
    # Drop a document whose estimated Jaccard similarity (MinHash, word 5-grams) with an earlier kept one is
    # at least this; 0 turns near-duplicate removal off (exact duplicates are always dropped).
    near_dedup: float = param(0.0, ge=0, le=1, note="0 turns it off")
    num_workers: int = param(0, ge=0)  # local cleaning processes; 0 means one per CPU core
    batch_chars: int = param(1_000_000, ge=1)  # characters of text handed to a worker at a time (bounds RAM)
    engine: Engine = "local"  # local (processes on this machine) | ray (tasks on a Ray cluster): same output
    section: InitVar[str] = "clean"  # the params section named in errors (from_mapping passes the one it read)

    def validate(self) -> None:
        check_engine(self.engine)
