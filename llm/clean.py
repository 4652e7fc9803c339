"""Clean raw files into Parquet shards of (id, source, text).

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
import gzip
import hashlib
import io
import json
import logging
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from llm.config import CleanConfig
from llm.engine import map_ordered
from llm.errors import InputError
from llm.fileio import atomic_dir
from llm.near_dedup import MinHashParams, NearDuplicateIndex, signature

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string())])
SHARD_NAME = "part-{:06d}.parquet"
ROW_GROUP_BYTES = 16 << 20
MAX_LISTED_FILES = 1000  # bad files named one by one in metrics/clean.json; all are counted

# C0 and C1 control characters except \t and \n (\r is turned into \n before this runs).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NEWLINES = re.compile(r"\r\n?")
_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK|End of (?:the )?Project Gutenberg)", re.M | re.I
)
# Inserted after the first character of a literal special token found in text, so that it reads the
# same but can never match the token (U+2060 WORD JOINER: invisible, no line break, not a control char).
NEUTRALISER = "\u2060"


@dataclasses.dataclass
class CleanStats:
    """Counts for metrics/clean.json. Bytes are UTF-8 bytes of document text."""

    files_in: int = 0
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    shards: int = 0
    duplicates: int = 0
    near_duplicates: int = 0  # dropped by clean.near_dedup: close to an earlier kept document, not equal
    gutenberg_stripped: int = 0  # documents whose Project Gutenberg header/footer was removed
    special_tokens_neutralised: int = 0  # literal special-token strings defused in text
    control_chars_removed: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # documents by reason
    dropped_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad_files: list = dataclasses.field(default_factory=list)  # [{"file", "reason"}] for skipped files

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
        return out

    def report(self) -> pd.DataFrame:
        """Drops by reason, as a table for the log."""
        rows = [(reason, count, self.dropped_bytes[reason]) for reason, count in sorted(self.dropped.items())]
        return pd.DataFrame(rows, columns=["reason", "documents", "bytes"]).set_index("reason")


@dataclasses.dataclass
class RawDocument:
    id: str
    source: str  # file under data/raw, as a relative POSIX path
    text: str


def neutralise_special_tokens(text: str, special_tokens: Iterable[str]) -> tuple[str, int]:
    """Defuse every literal occurrence of a special token so it stays plain text downstream."""
    total = 0
    for token in special_tokens:
        count = text.count(token)
        if count:
            text = text.replace(token, token[0] + NEUTRALISER + token[1:])
            total += count
    return text, total


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


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _encodes(text: str) -> bool:
    """Whether `text` has a UTF-8 form (no lone surrogate). Free for ASCII text: isascii reads a flag."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_plain_file(path: Path, name: str, stats: CleanStats) -> Iterator[RawDocument]:
    data = path.read_bytes()
    stats.documents_in += 1
    stats.bytes_in += len(data)
    if b"\x00" in data:
        stats.drop("binary", len(data), name)
        return
    text = _decode(data)
    if text is None:
        stats.drop("invalid_utf8", len(data), name)
        return
    yield RawDocument(id=name, source=name, text=text)


def open_jsonl(path: Path) -> BinaryIO:
    """A .jsonl file, or one compressed with gzip (.jsonl.gz) or Zstandard (.jsonl.zst), read as bytes."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(zstandard.open(path, "rb"))  # its reader has no readline of its own
    return open(path, "rb")


def read_jsonl_file(path: Path, name: str, stats: CleanStats) -> Iterator[RawDocument]:
    """One document per line, from its "text" field. A bad line is counted; the rest of the file is kept.
    A compressed file that turns out corrupt or cut short keeps the lines read before the damage and
    counts the rest as one `corrupt_compressed` drop."""
    try:
        yield from _read_jsonl_lines(path, name, stats)
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as err:
        stats.documents_in += 1
        stats.drop("corrupt_compressed", 0, f"{name}: {err}")


def _read_jsonl_lines(path: Path, name: str, stats: CleanStats) -> Iterator[RawDocument]:
    with open_jsonl(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            stats.documents_in += 1
            stats.bytes_in += len(line)
            raw = _decode(line)
            if raw is None:
                stats.drop("invalid_utf8", len(line), f"{name}:{lineno}")
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than Python's stack
                stats.drop("malformed_jsonl", len(line), f"{name}:{lineno}")
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                stats.drop("missing_text", len(line), f"{name}:{lineno}")
                continue
            if not _encodes(text):  # JSON's \ud800 escapes decode to lone surrogates, which UTF-8 cannot hold
                stats.drop("lone_surrogate", len(line), f"{name}:{lineno}")
                continue
            yield RawDocument(id=f"{name}:{lineno}", source=name, text=text)


def read_parquet_file(path: Path, name: str, stats: CleanStats) -> Iterator[RawDocument]:
    """One document per row, from its "text" column, read a batch at a time."""
    try:
        parquet = pq.ParquetFile(path)
        if "text" not in parquet.schema_arrow.names:
            stats.documents_in += 1
            stats.drop("missing_text_column", path.stat().st_size, name)
            return
        row = 0
        for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                stats.documents_in += 1
                if not isinstance(text, str):
                    stats.drop("missing_text", 0, f"{name}:{row}")
                else:
                    stats.bytes_in += len(text.encode())
                    yield RawDocument(id=f"{name}:{row}", source=name, text=text)
                row += 1
    except (pa.ArrowException, OSError) as err:
        stats.documents_in += 1
        stats.drop("unreadable_parquet", 0, f"{name}: {err}")


READERS = {
    ".txt": read_plain_file,
    ".md": read_plain_file,
    ".jsonl": read_jsonl_file,
    ".jsonl.gz": read_jsonl_file,
    ".jsonl.zst": read_jsonl_file,
    ".parquet": read_parquet_file,
}


def reader_for(name: str) -> Callable[[Path, str, CleanStats], Iterator[RawDocument]] | None:
    """The reader for a file name by its suffix (.jsonl.gz counts as a whole), or None."""
    lower = name.lower()
    return next((reader for suffix, reader in READERS.items() if lower.endswith(suffix)), None)


def iter_raw_documents(raw_dir: Path, stats: CleanStats) -> Iterator[RawDocument]:
    """Every document under `raw_dir`, files in sorted order; unsupported files are counted."""
    for path in sorted(p for p in raw_dir.rglob("*") if p.is_file()):
        name = path.relative_to(raw_dir).as_posix()
        stats.files_in += 1
        reader = reader_for(name)
        if reader is None:
            stats.documents_in += 1
            stats.bytes_in += path.stat().st_size
            stats.drop("unsupported_file", path.stat().st_size, name)
            continue
        try:
            yield from reader(path, name, stats)
        except OSError as err:
            stats.documents_in += 1
            stats.drop("unreadable_file", 0, f"{name}: {err.strerror}")


class DocumentShardWriter:
    """Appends documents to part-NNNNNN.parquet files of about `shard_bytes` of text each."""

    def __init__(self, out_dir: Path, shard_bytes: int) -> None:
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.rows: dict[str, list[str]] = {name: [] for name in SCHEMA.names}
        self.buffered = self.shard_written = 0
        self.writer: pq.ParquetWriter | None = None
        self.shards = 0

    def add(self, doc_id: str, source: str, text: str, nbytes: int) -> None:
        self.rows["id"].append(doc_id)
        self.rows["source"].append(source)
        self.rows["text"].append(text)
        self.buffered += nbytes
        if self.buffered >= ROW_GROUP_BYTES or self.shard_written + self.buffered >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.rows["id"]:
            return
        if self.writer is None:
            path = self.out_dir / SHARD_NAME.format(self.shards)
            self.writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
            self.shards += 1
        self.writer.write_table(pa.table(self.rows, schema=SCHEMA))
        self.shard_written += self.buffered
        self.rows = {name: [] for name in SCHEMA.names}
        self.buffered = 0
        if self.shard_written >= self.shard_bytes:
            self.writer.close()
            self.writer, self.shard_written = None, 0

    def close(self) -> int:
        self._flush()
        if self.writer is not None:
            self.writer.close()
        return self.shards


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


def batch_raw_documents(docs: Iterable[RawDocument], batch_chars: int) -> Iterator[list[RawDocument]]:
    """Group documents into lists of about `batch_chars` characters (a longer document is a batch alone)."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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
        batches = batch_raw_documents(iter_raw_documents(raw_dir, stats), cfg.batch_chars)
        for batch in map_ordered(clean_batch, batches, setup, cfg.engine, cfg.num_workers):
            stats.merge(batch.stats)
            for i, ((doc_id, source, text), raw_bytes, clean_bytes, digest) in enumerate(
                zip(batch.kept, batch.raw_bytes, batch.clean_bytes, batch.digests, strict=True)
            ):
                if digest in seen:
                    stats.duplicates += 1
                    stats.drop("duplicate", raw_bytes)
                    continue
                if near is not None and near.is_duplicate(batch.signatures[i]):
                    stats.near_duplicates += 1
                    stats.drop("near_duplicate", raw_bytes)
                    continue
                seen.add(digest)
                writer.add(doc_id, source, text, clean_bytes)
                stats.documents_out += 1
                stats.bytes_out += clean_bytes
        stats.shards = writer.close()
    return stats


def iter_documents(clean_dir: Path, batch_size: int = 256) -> Iterator[tuple[str, str]]:
    """(id, text) of every cleaned document, in order, streamed a Parquet batch at a time."""
    shards = sorted(Path(clean_dir).glob("part-*.parquet"))
    if not shards:
        raise InputError(f"{clean_dir}: no cleaned shards (part-*.parquet); run the clean stage first")
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(columns=["id", "text"], batch_size=batch_size):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)
