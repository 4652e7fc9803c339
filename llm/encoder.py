"""Fast encoding of a corpus with a trained tokenizer: text is cut into pieces at places no merge can
cross, each distinct piece is encoded once, and the ids are gathered with numpy. Same ids as encoding the
whole text, several times faster.
"""

import itertools
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd
from tokenizers import Tokenizer

# The longest piece encoded (or trained on) whole, when the caller does not say (tokenize.max_piece_chars does).
MAX_PIECE_CHARS = 4096

# A cut at one of these places cannot change the byte-level pre-tokenization (the GPT-2 regex), so
# encoding the pieces gives the same ids as encoding the whole text: before a single space that sits
# between two non-space characters, or after a single newline between two non-space characters.
_SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")


def split_text(text: str, chunk_chars: int, hard_cuts: bool = True) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` characters at safe places (see _SAFE_CUT).

    Where no safe place lies within twice `chunk_chars` (a long run without spaces, as in Chinese), the
    cut is made at `chunk_chars` regardless: the bytes are kept, only a merge across the cut is lost. With
    `hard_cuts` False it is made at the next safe place instead, however far (or not at all), so that the
    pieces encode to exactly the ids of the whole text.
    The result depends on the text alone, so encoding is the same whatever the batching.
    """
    if len(text) <= chunk_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        cut = _SAFE_CUT.search(text, start + chunk_chars, start + 2 * chunk_chars)
        if cut is None and not hard_cuts:
            cut = _SAFE_CUT.search(text, start + chunk_chars)
            if cut is None:
                break
        if cut is None and len(text) - start <= 2 * chunk_chars:
            break  # the rest is short enough to stay whole
        end = cut.start() if cut else start + chunk_chars
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


# Marks a cut before every space; undone where that space is followed by whitespace (or the end), since
# only a space followed by a non-space character always starts a new pre-token.
_CUT = "\x00"
_UNSAFE_CUT = re.compile(r"\x00 (?=\x00|\s|\Z)")


def split_pieces(text: str, max_piece_chars: int) -> list[str]:
    """Cut `text` before every space that precedes a non-space: ["Hello", " world", ",\nhow"]. Encoding
    the pieces one by one gives exactly the ids of encoding the whole text, and pieces repeat a lot,
    so each distinct piece is encoded once. Pieces longer than `max_piece_chars` go through split_text."""
    return _pieces(text, max_piece_chars)[0]


def _pieces(text: str, max_piece_chars: int) -> tuple[list[str], bool]:
    """split_pieces's pieces, and whether a piece longer than `max_piece_chars` was cut."""
    if _CUT in text:  # cannot mark cuts with a character the text holds (clean removes it)
        return split_text(text, max_piece_chars), len(text) > max_piece_chars
    pieces = _UNSAFE_CUT.sub(" ", text.replace(" ", _CUT + " ")).split(_CUT)
    if max(map(len, pieces)) <= max_piece_chars:
        return pieces, False
    return [part for piece in pieces for part in split_text(piece, max_piece_chars)], True


def _joinable(piece: str) -> bool:
    """Whether `piece` can be encoded joined to whatever precedes it with the same ids: it begins with a space
    and a non-space, a cut that no pre-token crosses."""
    return piece[:1] == " " and bool(piece[1:2].strip())


def split_for_training(text: str, max_piece_chars: int, chunk_chars: int) -> list[str]:
    """`text` as the tokenizer trainer is given it: cut where tokenize cuts it (split_pieces), so that the trainer
    counts the words the encoder will meet, and a run with no space in it (a hash, base64, a language written
    without spaces) costs it pieces of `max_piece_chars`, not one huge word whose merges cost time that grows
    faster than its length. For speed, in strings of about `chunk_chars` (the trainer's cost per string):
    pieces joined where the join changes no pre-token, or, when no piece was cut, split_text's chunks of the
    whole text, cut only at safe places (which change none either: a cut made where no safe place is near would
    split a word the encoder keeps whole)."""
    pieces, cut = _pieces(text, max_piece_chars)
    if not cut:
        return split_text(text, chunk_chars, hard_cuts=False)
    chunks, run, run_chars = [], [], 0
    for piece in pieces:
        if run and (run_chars >= chunk_chars or not _joinable(piece)):
            chunks.append("".join(run))
            run, run_chars = [], 0
        run.append(piece)
        run_chars += len(piece)
    chunks.append("".join(run))
    return chunks


class PieceEncoder:
    """Encodes many texts at once: splits them into pieces, encodes each distinct piece once (remembering
    up to `cache_size` pieces across calls), and gathers the ids with numpy. Several times faster than
    `encode_batch` on natural text, with identical ids (see split_pieces)."""

    def __init__(self, tokenizer: Tokenizer, max_piece_chars: int = MAX_PIECE_CHARS, cache_size: int = 1 << 17) -> None:
        self.tokenizer, self.max_piece_chars, self.cache_size = tokenizer, max_piece_chars, cache_size
        self.cache: dict[str, list[int]] = {}

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts concatenated as uint32, number of ids of each text)."""
        pieces, pieces_per_text = [], []
        for text in texts:
            split = split_pieces(text, self.max_piece_chars)
            pieces.extend(split)
            pieces_per_text.append(len(split))
        codes, uniques = pd.factorize(np.array(pieces, dtype=object), sort=False)
        uniques = uniques.tolist()
        missing = [piece for piece in uniques if piece not in self.cache]
        if len(self.cache) + len(missing) > self.cache_size:
            self.cache.clear()
            missing = uniques
        self.cache.update(zip(missing, self._encode_distinct(missing), strict=True))
        unique_ids = [self.cache[piece] for piece in uniques]
        unique_len = np.fromiter(map(len, unique_ids), dtype=np.int64, count=len(unique_ids))
        unique_flat = np.fromiter(itertools.chain.from_iterable(unique_ids), dtype=np.uint32, count=unique_len.sum())
        # Gather: piece occurrence k takes unique_flat[start[codes[k]] : start[codes[k]] + len[codes[k]]].
        piece_len = unique_len[codes]
        piece_offset = (np.cumsum(unique_len) - unique_len)[codes] - (np.cumsum(piece_len) - piece_len)
        ids = unique_flat[np.repeat(piece_offset, piece_len) + np.arange(piece_len.sum())]
        text_of_piece = np.repeat(np.arange(len(texts)), pieces_per_text)
        lengths = np.bincount(text_of_piece, weights=piece_len, minlength=len(texts)).astype(np.int64)
        return ids, lengths


    def _encode_distinct(self, pieces: list[str]) -> list[list[int]]:
        """Ids of each piece. The tokenizer's cost per call dwarfs its cost per character for pieces this
        short, so pieces that begin with a space and a non-space (a safe cut, whatever precedes it) are
        joined into texts of a few KB and their ids split back by character offsets."""
        joinable = [i for i, piece in enumerate(pieces) if _joinable(piece)]
        alone = sorted(set(range(len(pieces))) - set(joinable))
        ids: list[list[int] | None] = [None] * len(pieces)
        for i, encoding in zip(alone, self.tokenizer.encode_batch_fast([pieces[i] for i in alone],
                                                                       add_special_tokens=False), strict=True):
            ids[i] = encoding.ids
        groups = [joinable[k : k + 256] for k in range(0, len(joinable), 256)]
        encodings = self.tokenizer.encode_batch(["".join(pieces[i] for i in g) for g in groups],
                                                add_special_tokens=False)
        for group, encoding in zip(groups, encodings, strict=True):
            starts = np.cumsum([0] + [len(pieces[i]) for i in group[:-1]])
            token_starts = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
            owner = np.searchsorted(starts, token_starts, side="right") - 1
            bounds = np.searchsorted(owner, np.arange(len(group) + 1))
            token_ids = encoding.ids
            for k, i in enumerate(group):
                ids[i] = token_ids[bounds[k] : bounds[k + 1]]
        return ids


def count_tokens(tokenizer: Tokenizer, texts: Iterable[str], batch_size: int = 256,
                 max_piece_chars: int = MAX_PIECE_CHARS) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) over `texts`, encoded as tokenize encodes them."""
    encoder = PieceEncoder(tokenizer, max_piece_chars)
    tokens = nbytes = 0
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_size)):
        tokens += int(encoder.encode(batch)[1].sum())
        nbytes += sum(len(text.encode()) for text in batch)
    return tokens, nbytes
