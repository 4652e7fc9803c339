"""The `data` section: which corpus, and how documents are split into train and val."""

import dataclasses
from dataclasses import InitVar

from llm.config import Validated, param


@dataclasses.dataclass(frozen=True)
class DataConfig(Validated):
    # builtin corpus name, a local folder / file / glob, or a URL (llm/remote.py)
    source: str = param("shakespeare", nonempty=True)
    val_fraction: float = param(0.1, gt=0, lt=1)  # share of documents (by hash of their id) held out for validation
    seed: int = param(1337, ge=0)  # salts the document hash that assigns train/val
    section: InitVar[str] = "data"  # the params section named in errors (from_mapping passes the one it read)
