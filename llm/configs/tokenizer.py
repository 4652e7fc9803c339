"""The `tokenizer` section: the byte-level BPE's vocabulary and how it is trained."""

import dataclasses
from dataclasses import InitVar

from llm.config import EOT, MAX_VOCAB, FieldError, Validated, param


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(Validated):
    vocab_size: int = 8192  # target vocabulary: 256 byte tokens + merges + special tokens
    min_frequency: int = param(2, ge=1)  # a pair must occur this often to be merged
    special_tokens: tuple[str, ...] = (EOT,)  # added with the lowest ids; must include <|endoftext|>
    # train on at most this many characters of the train split (0 = all of it)
    max_train_chars: int = param(100_000_000, ge=0, note="0 = the whole train split")
    section: InitVar[str] = "tokenizer"  # the params section named in errors (from_mapping passes the one it read)

    def validate(self) -> None:
        if EOT not in self.special_tokens:
            raise FieldError("special_tokens", f"must include {EOT}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise FieldError("special_tokens", "must not repeat a token")
        if any(not token for token in self.special_tokens):
            raise FieldError("special_tokens", "must not contain an empty string")
        smallest = 256 + len(self.special_tokens)
        if not smallest <= self.vocab_size <= MAX_VOCAB:
            raise FieldError("vocab_size", f"must be in [{smallest}, {MAX_VOCAB}] (256 bytes + special tokens; "
                                           f"the README says why no more), got {self.vocab_size}")
