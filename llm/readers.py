"""Read the raw files under data/raw/ as documents: plain text (.txt, .md), JSON Lines (.jsonl, also compressed:
.jsonl.gz, .jsonl.zst) and Parquet, each format chosen by the file's suffix (llm/raw_formats.py).

Every file, line or row either becomes a document or is counted under a drop reason, with the bytes it held:
nothing is lost silently. A reader keeps what it could read of a damaged file.

A document over MAX_DOCUMENT_BYTES is dropped as `too_long`, before it is read whole where the format allows
(a plain file by its size, a JSONL line a block at a time): a few MB of compressed JSONL can hold a line of
gigabytes, which would take clean's memory many times over and no Parquet string column can hold.
"""

import dataclasses
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from llm.raw_formats import raw_format

# The largest document read, in bytes of its raw form (a file, a JSONL line, a Parquet value): far above any
# book (a few MB), and far below what one document costs clean (copies of its text in the reader, a worker,
# the shard writer) and the 2 GiB a Parquet string column holds.
MAX_DOCUMENT_BYTES = 64 << 20
SKIP_BLOCK_BYTES = 1 << 20  # an over-long line is read past this much at a time


class ReadCounts(Protocol):
    """Where the readers count what they read and what they drop (clean's CleanStats). Bytes are UTF-8 bytes."""

    files_in: int
    documents_in: int
    bytes_in: int

    def drop(self, reason: str, nbytes: int = 0, file: str | None = None) -> None: ...


@dataclasses.dataclass
class RawDocument:
    id: str
    source: str  # file under data/raw, as a relative POSIX path
    text: str


Reader = Callable[[Path, str, ReadCounts], Iterator[RawDocument]]


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


def read_plain_file(path: Path, name: str, stats: ReadCounts) -> Iterator[RawDocument]:
    """The whole file as one document."""
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        stats.documents_in += 1
        stats.bytes_in += size
        stats.drop("too_long", size, name)
        return
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


def read_jsonl_file(path: Path, name: str, stats: ReadCounts) -> Iterator[RawDocument]:
    """One document per line, from its "text" field. A bad line is counted; the rest of the file is kept.
    A compressed file that turns out corrupt or cut short keeps the lines read before the damage and
    counts the rest as one `corrupt_compressed` drop."""
    try:
        yield from _read_jsonl_lines(path, name, stats)
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as err:
        stats.documents_in += 1
        stats.drop("corrupt_compressed", 0, f"{name}: {err}")


def bounded_lines(f: BinaryIO, limit: int) -> Iterator[bytes | int]:
    """Each line of `f`, with its newline; for a line longer than `limit` bytes (its newline not counted), its
    length instead, read past a block at a time so that it is never held whole."""
    while line := f.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        length = len(line)
        while not line.endswith(b"\n") and (line := f.readline(SKIP_BLOCK_BYTES)):
            length += len(line)
        yield length


def _read_jsonl_lines(path: Path, name: str, stats: ReadCounts) -> Iterator[RawDocument]:
    with open_jsonl(path) as f:
        for lineno, line in enumerate(bounded_lines(f, MAX_DOCUMENT_BYTES), start=1):
            if isinstance(line, int):
                stats.documents_in += 1
                stats.bytes_in += line
                stats.drop("too_long", line, f"{name}:{lineno}")
                continue
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


def read_parquet_file(path: Path, name: str, stats: ReadCounts) -> Iterator[RawDocument]:
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
                elif (size := len(text.encode())) > MAX_DOCUMENT_BYTES:  # read already: Arrow bounds its pages
                    stats.bytes_in += size
                    stats.drop("too_long", size, f"{name}:{row}")
                else:
                    stats.bytes_in += size
                    yield RawDocument(id=f"{name}:{row}", source=name, text=text)
                row += 1
    except (pa.ArrowException, OSError) as err:
        stats.documents_in += 1
        stats.drop("unreadable_parquet", 0, f"{name}: {err}")


READERS: dict[str, Reader] = {  # one per format of llm/raw_formats.py
    "plain": read_plain_file,
    "jsonl": read_jsonl_file,
    "parquet": read_parquet_file,
}


def reader_for(name: str) -> Reader | None:
    """The reader for a file name by its suffix (.jsonl.gz counts as a whole), or None."""
    fmt = raw_format(name)
    return None if fmt is None else READERS[fmt]


def iter_raw_documents(raw_dir: Path, stats: ReadCounts) -> Iterator[RawDocument]:
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
