"""Byte-level BPE with Hugging Face `tokenizers`: build, train, save and load.

Byte-level means every string maps to tokens with no unknown token, and decode(encode(s)) == s.
Encoding a whole corpus fast is llm/encoder.py's job.
"""

import array
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm.config import EOT
from llm.configs.data import DataConfig
from llm.configs.tokenizer import TokenizerConfig
from llm.encoder import MAX_PIECE_CHARS, count_tokens, split_for_training
from llm.errors import InputError
from llm.fileio import write_bytes_atomic
from llm.split import is_val, require_both_splits

# Bytes per token is measured on the val split's first documents up to this many characters: one pass over
# the corpus, RAM bounded whatever its size.
VAL_SAMPLE_CHARS = 64 << 20


def build_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE: no normaliser (text is kept exactly), GPT-2 pre-tokenization."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, chunk_chars: int = 1 << 16,
                    max_piece_chars: int = MAX_PIECE_CHARS) -> Tokenizer:
    """Train on a stream of documents; memory grows with the number of distinct words, not the corpus. Text is
    cut as tokenize cuts it (tokenize.max_piece_chars: split_for_training), so that no run without a space
    costs the trainer more than its pieces do."""
    tokenizer = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def batches(batch_size: int = 256) -> Iterator[list[str]]:
        batch = []
        for text in texts:
            batch.extend(split_for_training(text, max_piece_chars, chunk_chars))
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    tokenizer.train_from_iterator(batches(), trainer=trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def sample_rank(doc_id: str, seed: int) -> int:
    """Where a train document comes in the tokenizer's sample order: a hash of its id salted with data.seed
    (and apart from the split's hash), so the sample is spread over the corpus whatever the file order."""
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8, key=f"tokenizer-sample:{seed}".encode()).digest()
    return int.from_bytes(digest, "little")


@dataclasses.dataclass(frozen=True)
class TrainSample:
    """The train documents a character budget admits, by sample_rank: those ranked below `cut_rank` whole, the
    one at `cut_rank` cut to `cut_chars` characters."""

    cut_rank: int
    cut_chars: int

    def chars(self, doc_id: str, seed: int, length: int) -> int:
        """Characters of this train document to train on (0: left out)."""
        rank = sample_rank(doc_id, seed)
        return length if rank < self.cut_rank else self.cut_chars if rank == self.cut_rank else 0


def train_budget(documents: Iterable[tuple[str, str]], data: DataConfig, max_chars: int) -> TrainSample | None:
    """Which train documents fit in `max_chars`, taken in sample_rank order, the last one cut to fit; None when
    the whole train split fits. One pass, keeping 16 bytes per train document (its rank and length)."""
    ranks, lengths = array.array("Q"), array.array("q")
    for doc_id, text in documents:
        if not is_val(doc_id, data.seed, data.val_fraction):
            ranks.append(sample_rank(doc_id, data.seed))
            lengths.append(len(text))
    order = np.argsort(np.frombuffer(ranks, dtype=np.uint64), kind="stable")
    ends = np.cumsum(np.frombuffer(lengths, dtype=np.int64)[order])
    if not len(ends) or ends[-1] <= max_chars:
        return None
    last = int(np.searchsorted(ends, max_chars))  # the first document that does not fit whole
    cut_chars = max_chars - (int(ends[last - 1]) if last else 0)
    return TrainSample(cut_rank=int(ranks[order[last]]), cut_chars=cut_chars)


def train_on_corpus(documents: Callable[[], Iterable[tuple[str, str]]], data: DataConfig,
                    cfg: TokenizerConfig, max_piece_chars: int = MAX_PIECE_CHARS) -> tuple[Tokenizer, dict[str, float]]:
    """Train on the train split of (id, text) documents (`documents()` streams them, in a fixed order), in one
    pass that also keeps a sample of the val split; return the tokenizer and its report (vocab size, bytes
    per token on that val sample, the train characters used). With tokenizer.max_train_chars, a first pass
    chooses which train documents fit in it (train_budget). Text is cut, for training and for the bytes per
    token, as tokenize cuts it (`max_piece_chars`: tokenize.max_piece_chars)."""
    budget = train_budget(documents(), data, cfg.max_train_chars) if cfg.max_train_chars else None
    val_sample: list[str] = []
    documents_per_split = {"train": 0, "val": 0}
    used = {"train_documents_used": 0, "train_chars_used": 0}

    def train_texts() -> Iterator[str]:
        sampled_chars = 0
        for doc_id, text in documents():
            if not is_val(doc_id, data.seed, data.val_fraction):
                documents_per_split["train"] += 1
                if budget is not None:
                    text = text[:budget.chars(doc_id, data.seed, len(text))]
                    if not text:
                        continue
                used["train_documents_used"] += 1
                used["train_chars_used"] += len(text)
                yield text
                continue
            documents_per_split["val"] += 1
            if sampled_chars < VAL_SAMPLE_CHARS:
                val_sample.append(text)
                sampled_chars += len(text)

    tokenizer = train_tokenizer(train_texts(), cfg, max_piece_chars=max_piece_chars)
    require_both_splits(documents_per_split)
    val_tokens, val_bytes = count_tokens(tokenizer, val_sample, max_piece_chars=max_piece_chars)
    report = {"vocab_size": tokenizer.get_vocab_size(), "val_tokens": val_tokens, "val_bytes": val_bytes,
              "val_bytes_per_token": val_bytes / max(val_tokens, 1), "train_documents": documents_per_split["train"],
              **used}
    return tokenizer, report


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    write_bytes_atomic(path, tokenizer.to_str().encode())


def load_tokenizer(path: Path) -> Tokenizer:
    """Load tokenizer.json. Special-token strings in input text are encoded as plain text, never as
    control tokens: only code (not text) can emit <|endoftext|>."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tokenizer not found; run the tokenizer stage first")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise InputError(f"{path}: not a valid tokenizer.json ({err})") from None
    if tokenizer.token_to_id(EOT) is None:
        raise InputError(f"{path}: tokenizer has no {EOT} token")
    tokenizer.encode_special_tokens = True
    return tokenizer


def tokenizer_from_str(json_text: str) -> Tokenizer:
    """A tokenizer from the JSON text of one that load_tokenizer accepted (sent to another process)."""
    tokenizer = Tokenizer.from_str(json_text)
    tokenizer.encode_special_tokens = True
    return tokenizer


# --- how a token reads -------------------------------------------------------------------------------------

def byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet back to bytes: the 188 printable bytes stand for themselves, the other 68
    (controls, space, ...) for the characters from U+0100 on, in order. Tokens are strings of these."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTES = byte_decoder()


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    return bytes(BYTES[c] for c in tokenizer.id_to_token(token_id))


def piece_text(piece: str) -> str:
    """A string of the byte-level alphabet (a token, a merge's part) as text; a piece of a character shows as
    its bytes, \\x escapes."""
    return bytes(BYTES[c] for c in piece).decode("utf-8", errors="backslashreplace")


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """What a token stands for: its text, or (a piece of a character) its bytes as \\x escapes; a control
    token's name."""
    if token_id in tokenizer.get_added_tokens_decoder():
        return tokenizer.id_to_token(token_id)
    return piece_text(tokenizer.id_to_token(token_id))


def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token on one line, as a figure's axis shows it (the attention heatmaps of reports/ and of the guide):
    its token_text, a newline drawn as ↵."""
    return token_text(tokenizer, token_id).replace("\n", "↵")
