"""Encode the cleaned corpus into train/val token shards, in parallel worker processes.

Documents stream from the Parquet shards into batches of about `batch_chars` characters; workers (local
processes or Ray tasks: llm/engine.py) encode batches and results are written in submission order, with a
bounded number in flight, so the output is byte-identical whatever the engine and the number of workers,
and RAM does not grow with the corpus.
"""

import collections
import dataclasses
from pathlib import Path

import numpy as np

from llm.config import EOT
from llm.configs.data import DataConfig
from llm.configs.tokenize import TokenizeConfig
from llm.documents import iter_documents
from llm.encoder import PieceEncoder
from llm.engine import batches_by_chars, map_ordered
from llm.fileio import atomic_dir, sha256_file
from llm.shards import SPLITS, ShardWriter, SplitMeta, TokensMeta, token_dtype, write_meta
from llm.split import is_val, require_both_splits
from llm.tokenizer import load_tokenizer, tokenizer_from_str


@dataclasses.dataclass
class EncodedBatch:
    tokens: dict[str, np.ndarray]  # split -> ids, each document preceded by <|endoftext|>
    documents: dict[str, int]
    bytes: dict[str, int]  # UTF-8 bytes of the documents' text


def encode_documents(encoder: PieceEncoder, docs: list[tuple[bool, str]], eot_id: int, dtype: np.dtype) -> EncodedBatch:
    """Encode (is_val, text) documents into one token array per split, <|endoftext|> before each."""
    ids, doc_lengths = encoder.encode([text for _, text in docs])
    doc_starts = np.cumsum(doc_lengths) - doc_lengths
    with_eot = np.insert(ids, doc_starts, eot_id).astype(dtype, copy=False)
    doc_is_val = np.array([val for val, _ in docs], dtype=bool)
    token_is_val = np.repeat(doc_is_val, doc_lengths + 1)
    doc_bytes = np.array([len(text.encode()) for _, text in docs], dtype=np.int64)
    return EncodedBatch(
        tokens={"train": with_eot[~token_is_val], "val": with_eot[token_is_val]},
        documents={"train": int((~doc_is_val).sum()), "val": int(doc_is_val.sum())},
        bytes={"train": int(doc_bytes[~doc_is_val].sum()), "val": int(doc_bytes[doc_is_val].sum())},
    )


@dataclasses.dataclass(frozen=True)
class EncoderSetup:
    """What a worker needs to encode batches; the tokenizer travels as its JSON text, so a worker on another
    machine needs no shared file system."""

    tokenizer_json: str
    eot_id: int
    dtype: str
    max_piece_chars: int

    def build(self) -> tuple[PieceEncoder, int, np.dtype]:
        encoder = PieceEncoder(tokenizer_from_str(self.tokenizer_json), self.max_piece_chars)
        return encoder, self.eot_id, np.dtype(self.dtype)


def _encode(state: tuple[PieceEncoder, int, np.dtype], docs: list[tuple[bool, str]]) -> EncodedBatch:
    encoder, eot_id, dtype = state
    return encode_documents(encoder, docs, eot_id, dtype)


def tokenize_corpus(
    clean_dir: Path, tokenizer_path: Path, out_dir: Path, data: DataConfig, cfg: TokenizeConfig
) -> TokensMeta:
    """Write {train,val}_NNNNNN.bin shards and meta.json into `out_dir` (replaced whole); return the meta."""
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size, eot_id = tokenizer.get_vocab_size(), tokenizer.token_to_id(EOT)
    dtype = token_dtype(vocab_size)
    docs = ((is_val(doc_id, data.seed, data.val_fraction), text) for doc_id, text in iter_documents(clean_dir))
    batches = batches_by_chars(docs, cfg.batch_chars, lambda doc: len(doc[1]))

    with atomic_dir(out_dir) as staging:
        writers = {split: ShardWriter(staging, split, dtype, cfg.shard_tokens) for split in SPLITS}
        counts = {split: collections.Counter() for split in SPLITS}
        setup = EncoderSetup(tokenizer.to_str(), eot_id, dtype.str, cfg.max_piece_chars)
        for result in map_ordered(_encode, batches, setup, cfg.engine, cfg.num_workers):
            for split in SPLITS:
                writers[split].write(result.tokens[split])
                counts[split]["documents"] += result.documents[split]
                counts[split]["bytes"] += result.bytes[split]
        shards = {split: tuple(path.name for path in writers[split].close()) for split in SPLITS}
        require_both_splits({split: counts[split]["documents"] for split in SPLITS})
        meta = TokensMeta(
            vocab_size=vocab_size,
            dtype=dtype.name,
            eot_id=eot_id,
            tokenizer_sha256=sha256_file(tokenizer_path),
            shard_tokens=cfg.shard_tokens,
            splits={split: SplitMeta(counts[split]["documents"], writers[split].total, counts[split]["bytes"],
                                     shards[split]) for split in SPLITS},
        )
        write_meta(staging, meta)
    return meta
