"""Byte-level BPE with Hugging Face `tokenizers`: build, train, save and load.

Byte-level means every string maps to tokens with no unknown token, and decode(encode(s)) == s.
Encoding a whole corpus fast is llm/encoder.py's job.
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm.config import EOT, DataConfig, TokenizerConfig
from llm.encoder import count_tokens, split_text
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


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, chunk_chars: int = 1 << 16) -> Tokenizer:
    """Train on a stream of documents; memory grows with the number of distinct words, not the corpus."""
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
            batch.extend(split_text(text, chunk_chars))
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    tokenizer.train_from_iterator(batches(), trainer=trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def train_on_corpus(documents: Iterable[tuple[str, str]], data: DataConfig,
                    cfg: TokenizerConfig) -> tuple[Tokenizer, dict[str, float]]:
    """Train on the train split of (id, text) documents, in one pass that also keeps a sample of the val
    split; return the tokenizer and its report (vocab size, bytes per token on that val sample)."""
    val_sample: list[str] = []
    documents_per_split = {"train": 0, "val": 0}

    def train_texts() -> Iterator[str]:
        sampled_chars = 0
        for doc_id, text in documents:
            if not is_val(doc_id, data.seed, data.val_fraction):
                documents_per_split["train"] += 1
                yield text
                continue
            documents_per_split["val"] += 1
            if sampled_chars < VAL_SAMPLE_CHARS:
                val_sample.append(text)
                sampled_chars += len(text)

    tokenizer = train_tokenizer(train_texts(), cfg)
    require_both_splits(documents_per_split)
    val_tokens, val_bytes = count_tokens(tokenizer, val_sample)
    report = {"vocab_size": tokenizer.get_vocab_size(), "val_tokens": val_tokens, "val_bytes": val_bytes,
              "val_bytes_per_token": val_bytes / max(val_tokens, 1)}
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
