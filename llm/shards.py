"""Token shards in llm.c's layout: a header of 256 little-endian int32, then the tokens.

header[0] magic (20240520 for uint16 tokens, 20240801 for uint32), header[1] version (1 or 7),
header[2] number of tokens. Readers check all of it before trusting a byte.

Beside the shards, meta.json describes them (TokensMeta): its one reader and writer are here too.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from llm.errors import InputError
from llm.fileio import sha256_file, write_json_atomic

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
FORMATS = {  # token dtype -> (magic, version)
    np.dtype("<u2"): (20240520, 1),
    np.dtype("<u4"): (20240801, 7),
}
VALIDATE_BLOCK = 1 << 24  # tokens scanned at a time when checking ids, to bound RAM


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def make_header(dtype: np.dtype, num_tokens: int) -> bytes:
    magic, version = FORMATS[np.dtype(dtype)]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, num_tokens
    return header.tobytes()


class ShardWriter:
    """Streams tokens of one split into {split}_NNNNNN.bin files of at most `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, np.dtype(dtype), shard_tokens
        self.paths: list[Path] = []
        self.file = None
        self.in_shard = 0
        self.total = 0

    def _open(self) -> None:
        path = self.out_dir / shard_name(self.split, len(self.paths))
        self.paths.append(path)
        self.file = open(path, "wb")  # noqa: SIM115 (kept open across write calls)
        self.file.write(make_header(self.dtype, 0))
        self.in_shard = 0

    def _close_shard(self) -> None:
        self.file.seek(0)
        self.file.write(make_header(self.dtype, self.in_shard))
        self.file.close()
        self.file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        while tokens.size:
            if self.file is None:
                self._open()
            take = min(tokens.size, self.shard_tokens - self.in_shard)
            self.file.write(tokens[:take].tobytes())
            self.in_shard += take
            self.total += take
            tokens = tokens[take:]
            if self.in_shard == self.shard_tokens:
                self._close_shard()

    def close(self) -> list[Path]:
        """Finish the last shard; a split with no tokens still gets one (empty) shard."""
        if self.file is None and not self.paths:
            self._open()
        if self.file is not None:
            self._close_shard()
        return self.paths


def read_header(path: Path) -> tuple[np.dtype, int]:
    """(token dtype, number of tokens) after checking magic, version and file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as err:
        raise InputError(f"{path}: cannot read token shard ({err.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise InputError(f"{path}: corrupt token shard: {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, version, num_tokens = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    dtype = next((dt for dt, (m, _) in FORMATS.items() if m == magic), None)
    if dtype is None:
        raise InputError(f"{path}: not a token shard: magic {magic} is neither 20240520 nor 20240801")
    if version != FORMATS[dtype][1]:
        raise InputError(f"{path}: corrupt token shard: version {version} does not go with magic {magic}")
    expected = HEADER_BYTES + num_tokens * dtype.itemsize
    if num_tokens < 0 or size != expected:
        raise InputError(
            f"{path}: corrupt or truncated token shard: header says {num_tokens} tokens "
            f"({expected} bytes), file has {size} bytes"
        )
    return dtype, num_tokens


def open_shard(path: Path, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a shard's tokens (read-only). With `vocab_size`, also check every id is below it."""
    dtype, num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if vocab_size is not None:
        for start in range(0, num_tokens, VALIDATE_BLOCK):
            largest = int(tokens[start : start + VALIDATE_BLOCK].max())
            if largest >= vocab_size:
                raise InputError(f"{path}: corrupt token shard: id {largest} is not below vocab size {vocab_size}")
    return tokens


# data/tokens/meta.json: what the tokenize stage wrote, read back by train and evaluate through TokensMeta.
META_NAME = "meta.json"
SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class SplitMeta:
    documents: int  # documents in the split
    tokens: int  # tokens in all its shards, one <|endoftext|> per document included
    bytes: int  # UTF-8 bytes of the documents' text
    shards: tuple[str, ...]  # shard file names, in order, in the same folder as meta.json


@dataclasses.dataclass(frozen=True)
class TokensMeta:
    vocab_size: int  # of the tokenizer that made the shards
    dtype: str  # token dtype in the shards: uint16 or uint32
    eot_id: int  # id of <|endoftext|>, which starts every document
    tokenizer_sha256: str  # of that tokenizer.json: shards and model must come from the same one
    shard_tokens: int  # most tokens per shard
    splits: dict[str, SplitMeta]  # "train" and "val"

    def shard_paths(self, tokens_dir: Path, split: str) -> list[Path]:
        return [Path(tokens_dir) / name for name in self.splits[split].shards]

    def check_tokenizer(self, tokens_dir: Path, tokenizer_path: Path) -> None:
        """The one check that shards and a model (or tokenizer) agree: the same tokenizer.json made both."""
        if sha256_file(tokenizer_path) != self.tokenizer_sha256:
            raise InputError(f"{Path(tokens_dir) / META_NAME}: the shards were made with another tokenizer than "
                             f"{tokenizer_path}; rerun the tokenize stage")

    def to_dict(self) -> dict[str, Any]:
        return {"format": "llm.c token shards: 256 int32 header (magic, version, num_tokens), then tokens",
                **dataclasses.asdict(self)}


def write_meta(tokens_dir: Path, meta: TokensMeta) -> None:
    write_json_atomic(Path(tokens_dir) / META_NAME, meta.to_dict())


def read_meta(tokens_dir: Path) -> TokensMeta:
    """meta.json, checked field by field: a missing or mistyped field is an InputError naming it."""
    path = Path(tokens_dir) / META_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found; run the tokenize stage first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable token metadata ({err})") from None

    def field(mapping: Any, key: str, kind: type, where: str = "") -> Any:
        value = mapping.get(key) if isinstance(mapping, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            expected = "a non-negative integer" if kind is int else f"a {kind.__name__}"
            raise InputError(f"{path}: field {where}{key} is missing or not {expected}; rerun the tokenize stage")
        return value

    if isinstance(raw, dict) and not isinstance(raw.get("format", ""), str):  # a description, but ours is a string
        raise InputError(f"{path}: field format is not a string; rerun the tokenize stage")
    splits = {}
    for split in SPLITS:
        entry = field(field(raw, "splits", dict), split, dict, "splits.")
        where = f"splits.{split}."
        shards = field(entry, "shards", list, where)
        if not all(isinstance(name, str) and name == Path(name).name and name for name in shards):
            raise InputError(f"{path}: field {where}shards must list file names in {tokens_dir}")
        splits[split] = SplitMeta(field(entry, "documents", int, where), field(entry, "tokens", int, where),
                                  field(entry, "bytes", int, where), tuple(shards))
    meta = TokensMeta(field(raw, "vocab_size", int), field(raw, "dtype", str), field(raw, "eot_id", int),
                      field(raw, "tokenizer_sha256", str), field(raw, "shard_tokens", int), splits)
    if meta.dtype != token_dtype(meta.vocab_size).name or meta.eot_id >= meta.vocab_size:
        raise InputError(f"{path}: dtype {meta.dtype} and eot_id {meta.eot_id} do not fit vocab_size "
                         f"{meta.vocab_size}; rerun the tokenize stage")
    for split in SPLITS:
        _check_counts(path, split, meta)
    return meta


def _check_counts(path: Path, split: str, meta: TokensMeta) -> None:
    """meta.json's counts of a split against its shards: training's bits per byte is computed from them, so a
    false count gave a false figure (64.9 bits per byte for 3.8). The tokens must be what the shard headers
    hold. The bytes (of the documents' UTF-8 text) cannot be read from the shards without the tokenizer; what
    holds without it: each document starts with one <|endoftext|> token, which stands for no text, and every
    other token of a byte-level BPE stands for at least one byte."""
    counts = meta.splits[split]
    where = f"{path}: field splits.{split}."
    in_shards = 0
    for shard in meta.shard_paths(path.parent, split):
        (dtype, num_tokens) = read_header(shard)
        if dtype.name != meta.dtype:
            raise InputError(f"{shard}: {dtype.name} tokens, but {path} says {meta.dtype}; rerun the tokenize stage")
        in_shards += num_tokens
    if counts.tokens != in_shards:
        raise InputError(f"{where}tokens says {counts.tokens}, but its shards' headers hold {in_shards} tokens; "
                         "rerun the tokenize stage")
    if counts.documents > counts.tokens:
        raise InputError(f"{where}documents says {counts.documents}, more than its {counts.tokens} tokens (each "
                         "document starts with a token); rerun the tokenize stage")
    if counts.bytes < counts.tokens - counts.documents:
        raise InputError(f"{where}bytes says {counts.bytes}, fewer than its {counts.tokens - counts.documents} "
                         "text tokens (each stands for at least one byte); rerun the tokenize stage")
