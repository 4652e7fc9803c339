"""The `tokenize` section: how the cleaned corpus is encoded into token shards."""

import dataclasses
from dataclasses import InitVar

from llm.config import Engine, Validated, check_engine, param


@dataclasses.dataclass(frozen=True)
class TokenizeConfig(Validated):
    shard_tokens: int = param(100_000_000, ge=1)  # tokens per shard file (llm.c uses 1e8)
    num_workers: int = param(0, ge=0)  # local encoding processes; 0 means one per CPU core
    max_piece_chars: int = param(4096, ge=1)  # longest run encoded at once; a longer run with no space in it is cut
    batch_chars: int = param(1_000_000, ge=1)  # characters of text handed to a worker at a time (bounds RAM)
    engine: Engine = "local"  # local (processes on this machine) | ray (tasks on a Ray cluster): same output
    section: InitVar[str] = "tokenize"  # the params section named in errors (from_mapping passes the one it read)

    def validate(self) -> None:
        check_engine(self.engine)
