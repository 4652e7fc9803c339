"""Typed, frozen configs for each stage, built from plain mappings and validated before any work.

`llm` never reads params.yaml: `stages` loads it and hands each section to `from_mapping`.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from llm.errors import ConfigError

EOT = "<|endoftext|>"
MAX_VOCAB = 2**32  # token ids are stored as uint32 at most


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "shakespeare"  # builtin corpus name, or a local folder / glob of .txt .md .jsonl .parquet
    val_fraction: float = 0.1  # share of documents (by hash of their id) held out for validation
    seed: int = 1337  # salts the document hash that assigns train/val

    def validate(self) -> None:
        if not self.source.strip():
            raise ConfigError("data.source", "must not be empty")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    min_chars: int = 64  # documents shorter than this after cleaning are dropped
    shard_mb: int = 128  # UTF-8 megabytes of text per Parquet shard in data/clean/

    def validate(self) -> None:
        if self.min_chars < 0:
            raise ConfigError("clean.min_chars", f"must be >= 0, got {self.min_chars}")
        if self.shard_mb < 1:
            raise ConfigError("clean.shard_mb", f"must be >= 1, got {self.shard_mb}")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 8192  # target vocabulary: 256 byte tokens + merges + special tokens
    min_frequency: int = 2  # a pair must occur this often to be merged
    special_tokens: tuple[str, ...] = (EOT,)  # added with the lowest ids; must include <|endoftext|>

    def validate(self) -> None:
        if EOT not in self.special_tokens:
            raise ConfigError("tokenizer.special_tokens", f"must include {EOT}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError("tokenizer.special_tokens", "must not repeat a token")
        if any(not token for token in self.special_tokens):
            raise ConfigError("tokenizer.special_tokens", "must not contain an empty string")
        smallest = 256 + len(self.special_tokens)
        if not smallest <= self.vocab_size <= MAX_VOCAB:
            raise ConfigError(
                "tokenizer.vocab_size",
                f"must be in [{smallest}, {MAX_VOCAB}] (256 bytes + special tokens), got {self.vocab_size}",
            )
        if self.min_frequency < 1:
            raise ConfigError("tokenizer.min_frequency", f"must be >= 1, got {self.min_frequency}")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    shard_tokens: int = 100_000_000  # tokens per shard file (llm.c uses 1e8)
    num_workers: int = 0  # encoding processes; 0 means one per CPU core
    max_piece_chars: int = 4096  # longest run encoded at once; a longer run with no space in it is cut
    batch_chars: int = 1_000_000  # characters of text handed to a worker at a time (bounds RAM)

    def validate(self) -> None:
        for name in ("shard_tokens", "max_piece_chars", "batch_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tokenize.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError("tokenize.num_workers", f"must be >= 0, got {self.num_workers}")


T = TypeVar("T")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check one value against a field's type; ints are accepted for floats, lists become tuples."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(option for option in options if option is not type(None))
        origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        (item_kind, _) = typing.get_args(kind)
        return tuple(_coerce(f"{key}[{i}]", item, item_kind) for i, item in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(key, f"must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_mapping(cls: type[T], values: Mapping[str, Any], section: str, *, require_all: bool = True) -> T:
    """Build config `cls` from `values`; unknown keys, missing keys and wrong types are errors."""
    if not isinstance(values, Mapping):
        raise ConfigError(section, f"must be a mapping of keys, got {type(values).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", f"unknown key (known: {', '.join(fields)})")
    missing = [name for name in fields if name not in values]
    if require_all and missing:
        raise ConfigError(f"{section}.{missing[0]}", "missing key")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(f"{section}.{name}", values[name], hints[name]) for name in fields if name in values}
    config = cls(**kwargs)
    config.validate()
    return config
