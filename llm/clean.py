"""Clean raw files into Parquet shards of (id, source, text), one document at a time.

Every document that goes in is either written out or counted under a drop reason: nothing is lost
silently. The corpus is streamed: RAM holds one document (or one Parquet batch) plus a write buffer and
a 16-byte hash per kept document for exact deduplication.
"""

import collections
import dataclasses
import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llm.config import CleanConfig
from llm.errors import InputError
from llm.fileio import atomic_dir

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


def read_jsonl_file(path: Path, name: str, stats: CleanStats) -> Iterator[RawDocument]:
    """One document per line, from its "text" field. A bad line is counted; the rest of the file is kept."""
    with open(path, "rb") as f:
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


READERS = {".txt": read_plain_file, ".md": read_plain_file, ".jsonl": read_jsonl_file, ".parquet": read_parquet_file}


def iter_raw_documents(raw_dir: Path, stats: CleanStats) -> Iterator[RawDocument]:
    """Every document under `raw_dir`, files in sorted order; unsupported files are counted."""
    for path in sorted(p for p in raw_dir.rglob("*") if p.is_file()):
        name = path.relative_to(raw_dir).as_posix()
        stats.files_in += 1
        reader = READERS.get(path.suffix.lower())
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


def clean_corpus(raw_dir: Path, out_dir: Path, cfg: CleanConfig, special_tokens: Iterable[str]) -> CleanStats:
    """Clean every document under `raw_dir` into Parquet shards that replace `out_dir` whole."""
    if not Path(raw_dir).is_dir():
        raise InputError(f"{raw_dir}: raw corpus folder not found; run the fetch stage first")
    special_tokens = tuple(special_tokens)
    stats = CleanStats()
    seen: set[bytes] = set()
    with atomic_dir(out_dir) as staging:
        writer = DocumentShardWriter(staging, cfg.shard_mb << 20)
        for doc in iter_raw_documents(raw_dir, stats):
            raw_bytes = len(doc.text.encode())
            text = clean_text(doc.text, special_tokens, stats)
            if not text:
                stats.drop("empty", raw_bytes)
                continue
            if len(text) < cfg.min_chars:
                stats.drop("too_short", raw_bytes)
                continue
            encoded = text.encode()
            digest = hashlib.blake2b(encoded, digest_size=16).digest()
            if digest in seen:
                stats.duplicates += 1
                stats.drop("duplicate", raw_bytes)
                continue
            seen.add(digest)
            writer.add(doc.id, doc.source, text, len(encoded))
            stats.documents_out += 1
            stats.bytes_out += len(encoded)
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
