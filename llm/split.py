"""The train/val split: by document, from a keyed hash of its id, so it never depends on order."""

import hashlib

from llm.errors import ConfigError


def is_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    """True when document `doc_id` belongs to the validation split (data.seed, data.val_fraction)."""
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def require_both_splits(documents: dict[str, int]) -> None:
    """Each split must hold a document: {"train": n, "val": m} with n, m > 0, else the split params are wrong."""
    for split, count in documents.items():
        if count == 0:
            raise ConfigError("data.val_fraction", f"the {split} split has no documents "
                              f"({sum(documents.values())} in all); change data.val_fraction or data.seed, "
                              "or add documents")
