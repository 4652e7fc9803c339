"""Clean the raw documents (read by llm/readers.py) into the cleaned-document shards of llm/documents.py.

Every document that goes in is either written out or counted under a drop reason: nothing is lost
silently. The corpus is streamed: this process (the driver) reads documents in file order and hands
batches of them to workers (local processes or Ray tasks: llm/engine.py), which normalise and filter
each document and compute its hashes; the driver takes the results back in order, drops exact and near
duplicates of earlier kept documents, and writes the shards, so the output is the same bytes whatever the
engine. RAM holds the batches in flight and a write buffer, plus a 16-byte hash per kept document for
exact deduplication (and its MinHash signature when clean.near_dedup is on: llm/near_dedup.py).
"""

import collections
import dataclasses
import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from llm.configs.clean import CleanConfig
from llm.documents import DocumentShardWriter
from llm.engine import batches_by_chars, map_ordered
from llm.errors import InputError
from llm.fileio import atomic_dir
from llm.near_dedup import MinHashParams, NearDuplicateIndex, signature
from llm.readers import RawDocument, iter_raw_documents
from llm.special_tokens import NEUTRALISER, neutralise_special_tokens  # noqa: F401  (NEUTRALISER: clean's API)

log = logging.getLogger(__name__)

MAX_LISTED_FILES = 1000  # bad files named one by one in metrics/clean.json; all are counted

# C0 and C1 control characters except \t and \n (\r is turned into \n before this runs).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NEWLINES = re.compile(r"\r\n?")
_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK|End of (?:the )?Project Gutenberg)", re.M | re.I
)


@dataclasses.dataclass
class CleanStats:
    """Counts for metrics/clean.json. Bytes are UTF-8 bytes of document text."""

    files_in: int = 0
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    shards: int = 0
    gutenberg_stripped: int = 0  # documents whose Project Gutenberg header/footer was removed
    special_tokens_neutralised: int = 0  # literal special-token strings defused in text
    control_chars_removed: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # documents by reason
    dropped_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad_files: list = dataclasses.field(default_factory=list)  # [{"file", "reason"}] for skipped files

    @property
    def duplicates(self) -> int:
        """Documents equal (after cleaning) to an earlier kept one."""
        return self.dropped["duplicate"]

    @property
    def near_duplicates(self) -> int:
        """Documents dropped by clean.near_dedup: close to an earlier kept document, not equal."""
        return self.dropped["near_duplicate"]

    def drop(self, reason: str, nbytes: int = 0, file: str | None = None) -> None:
        self.dropped[reason] += 1
        self.dropped_bytes[reason] += nbytes
        if file is not None and len(self.bad_files) < MAX_LISTED_FILES:
            self.bad_files.append({"file": file, "reason": reason})

    def merge(self, other: "CleanStats") -> None:
        """Add the counts of `other` (a worker's, for one batch) to these."""
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if isinstance(mine, list):
                mine.extend(theirs[: MAX_LISTED_FILES - len(mine)])
            elif isinstance(mine, collections.Counter):
                mine.update(theirs)
            else:
                setattr(self, field.name, mine + theirs)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["dropped"] = dict(sorted(self.dropped.items()))
        out["dropped_bytes"] = dict(sorted(self.dropped_bytes.items()))
        out["documents_dropped"] = sum(self.dropped.values())
        out["duplicates"], out["near_duplicates"] = self.duplicates, self.near_duplicates
        return out

    def report(self) -> pd.DataFrame:
        """Drops by reason, as a table for the log."""
        rows = [(reason, count, self.dropped_bytes[reason]) for reason, count in sorted(self.dropped.items())]
        return pd.DataFrame(rows, columns=["reason", "documents", "bytes"]).set_index("reason")


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Keep only what lies between Project Gutenberg's START and END markers, when present."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end() if start else 0)
    if not start and not end:
        return text, False
    return text[start.end() if start else 0 : end.start() if end else len(text)], True


def clean_text(text: str, special_tokens: Iterable[str], stats: CleanStats) -> str:
    """Normalise one document: BOM, newlines, NFC, control characters, boilerplate, special tokens."""
    text = text.removeprefix("\ufeff")
    text = _NEWLINES.sub("\n", text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text, removed = _CONTROL.subn("", text)
    stats.control_chars_removed += removed
    text, stripped = strip_gutenberg(text)
    stats.gutenberg_stripped += stripped
    text, neutralised = neutralise_special_tokens(text, special_tokens)
    stats.special_tokens_neutralised += neutralised
    return text.strip()


@dataclasses.dataclass(frozen=True)
class CleanSetup:
    """What a worker needs to clean batches of documents (engine.Setup)."""

    special_tokens: tuple[str, ...]
    min_chars: int
    minhash: MinHashParams | None  # None: near-duplicate removal is off

    def build(self) -> "CleanSetup":
        return self


@dataclasses.dataclass
class CleanedBatch:
    """A worker's result for one batch: the documents that passed the filters, in order, with what the
    driver needs to deduplicate them, and the batch's counts."""

    kept: list[tuple[str, str, str]]  # (id, source, cleaned text)
    raw_bytes: list[int]  # each kept document's UTF-8 bytes before cleaning: what a dedup drop counts
    clean_bytes: list[int]  # and after cleaning: what the shard writer counts
    digests: list[bytes]  # blake2b-128 of the cleaned text, for exact deduplication
    signatures: np.ndarray | None  # (documents, num_perm) MinHash signatures, when near_dedup is on
    stats: CleanStats


def clean_batch(setup: CleanSetup, docs: list[RawDocument]) -> CleanedBatch:
    """Normalise and filter each document; hash what is left. Runs in a worker: a pure function of its input."""
    stats = CleanStats()
    result = CleanedBatch([], [], [], [], None, stats)
    for doc in docs:
        raw_bytes = len(doc.text.encode())
        text = clean_text(doc.text, setup.special_tokens, stats)
        if not text:
            stats.drop("empty", raw_bytes)
        elif len(text) < setup.min_chars:
            stats.drop("too_short", raw_bytes)
        else:
            encoded = text.encode()
            result.kept.append((doc.id, doc.source, text))
            result.raw_bytes.append(raw_bytes)
            result.clean_bytes.append(len(encoded))
            result.digests.append(hashlib.blake2b(encoded, digest_size=16).digest())
    if setup.minhash is not None and result.kept:
        result.signatures = np.stack([signature(text, setup.minhash) for _, _, text in result.kept])
    return result


def clean_corpus(raw_dir: Path, out_dir: Path, cfg: CleanConfig, special_tokens: Iterable[str]) -> CleanStats:
    """Clean every document under `raw_dir` into Parquet shards that replace `out_dir` whole."""
    if not Path(raw_dir).is_dir():
        raise InputError(f"{raw_dir}: raw corpus folder not found; run the fetch stage first")
    minhash = MinHashParams(threshold=cfg.near_dedup) if cfg.near_dedup else None
    setup = CleanSetup(tuple(special_tokens), cfg.min_chars, minhash)
    near = NearDuplicateIndex(minhash) if minhash else None
    stats = CleanStats()
    seen: set[bytes] = set()
    with atomic_dir(out_dir) as staging:
        writer = DocumentShardWriter(staging, cfg.shard_mb << 20)
        batches = batches_by_chars(iter_raw_documents(raw_dir, stats), cfg.batch_chars, lambda doc: len(doc.text))
        for batch in map_ordered(clean_batch, batches, setup, cfg.engine, cfg.num_workers):
            stats.merge(batch.stats)
            for i, ((doc_id, source, text), raw_bytes, clean_bytes, digest) in enumerate(
                zip(batch.kept, batch.raw_bytes, batch.clean_bytes, batch.digests, strict=True)
            ):
                if digest in seen:
                    stats.drop("duplicate", raw_bytes)
                    continue
                if near is not None and near.is_duplicate(batch.signatures[i]):
                    stats.drop("near_duplicate", raw_bytes)
                    continue
                seen.add(digest)
                writer.add(doc_id, source, text, clean_bytes)
                stats.documents_out += 1
                stats.bytes_out += clean_bytes
        stats.shards = writer.close()
    return stats

