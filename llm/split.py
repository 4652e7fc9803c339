"""The train/val split: by document, from a keyed hash of its id, so it never depends on order."""

import hashlib


def is_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    """True when document `doc_id` belongs to the validation split (data.seed, data.val_fraction)."""
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64
