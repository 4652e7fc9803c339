"""The cleaned-document format of data/clean/: Parquet shards part-NNNNNN.parquet of (id, source, text) rows, as
clean writes them and the tokenizer and tokenize read them. This module is its one writer and reader, as
llm/shards.py is for token shards."""

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llm.errors import InputError, first_line

SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string())])
SHARD_NAME = "part-{:06d}.parquet"
SHARD_GLOB = "part-*.parquet"
ROW_GROUP_BYTES = 16 << 20


class DocumentShardWriter:
    """Appends documents to part-NNNNNN.parquet files of about `shard_bytes` of text each."""

    def __init__(self, out_dir: Path, shard_bytes: int) -> None:
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.rows: dict[str, list[str]] = {name: [] for name in SCHEMA.names}
        self.buffered = self.shard_written = 0
        self.writer: pq.ParquetWriter | None = None
        self.shards = 0

    def add(self, doc_id: str, source: str, text: str, nbytes: int) -> None:
        """Append one document; `nbytes` is its text's UTF-8 length, what shard and row-group sizes count."""
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
        """Write what is buffered and close the last shard; return the number of shards written."""
        self._flush()
        if self.writer is not None:
            self.writer.close()
        return self.shards


def iter_documents(clean_dir: Path, batch_size: int = 256) -> Iterator[tuple[str, str]]:
    """(id, text) of every cleaned document, in order, streamed a Parquet batch at a time."""
    shards = sorted(Path(clean_dir).glob(SHARD_GLOB))
    if not shards:
        raise InputError(f"{clean_dir}: no cleaned shards ({SHARD_GLOB}); run the clean stage first")
    for shard in shards:
        yield from _shard_documents(shard, batch_size)


def _shard_documents(shard: Path, batch_size: int) -> Iterator[tuple[str, str]]:
    """One shard's (id, text) rows; a shard that is not Parquet, is cut short, or lacks string columns id and
    text is an InputError naming it (pyarrow's own error is a traceback)."""
    try:
        file = pq.ParquetFile(shard)
        for name in ("id", "text"):
            if file.schema_arrow.get_field_index(name) < 0 or file.schema_arrow.field(name).type != pa.string():
                raise InputError(f"{shard}: not a cleaned shard: no string column {name!r}; rerun the clean stage")
        for batch in file.iter_batches(columns=["id", "text"], batch_size=batch_size):
            ids, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            if None in ids or None in texts:
                raise InputError(f"{shard}: a row without an id or text; rerun the clean stage")
            yield from zip(ids, texts, strict=True)
    except (OSError, pa.ArrowException) as err:  # ArrowInvalid, ArrowIOError...: a damaged file
        raise InputError(f"{shard}: unreadable cleaned shard ({first_line(err)}); rerun the clean stage") from None
