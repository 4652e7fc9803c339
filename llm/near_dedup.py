"""Near-duplicate detection with MinHash and LSH (locality-sensitive hashing), as FineWeb does.

Two halves, matching the clean stage's workers and driver:

- `signature(text, params)`: a pure function of the text and the parameters (no salted `hash()`, no
  global state), so any process on any machine gives the same array. A document's shingles are its
  word n-grams; a signature holds, for each of `num_perm` hash functions, the least hash over them. Two
  signatures agree at a position with probability about the Jaccard similarity of the shingle sets.
- `NearDuplicateIndex.is_duplicate(sig)`: walks signatures in corpus order and says whether each is a
  near-duplicate of an earlier *kept* one: it shares an LSH band with it (the cheap filter) and their
  estimated Jaccard is at least the threshold (the check that keeps a chance band collision from
  dropping a distinct document). The first of a group is kept; dropped documents are never indexed.

Words are runs of `\\w` in the lowercased text, so punctuation, spacing and case do not count: web
near-duplicates often differ in exactly those. Languages written without spaces (Chinese, Japanese,
Thai) get one "word" per run of letters, so their shingles are coarse.
"""

import dataclasses
import functools
import hashlib
import math
import re
import zlib

import numpy as np

DEFAULT_NUM_PERM = 120
# Shingles hashed per block in `signature`: a (block, num_perm) uint64 matrix is 3.75 MiB at 120.
SHINGLE_BLOCK = 4096
_WORD = re.compile(r"\w+")
_U64_MAX = np.iinfo(np.uint64).max
# Weights of the false-positive and false-negative areas under the LSH S-curve (datasketch's default).
_FALSE_POSITIVE_WEIGHT = 0.5
_FALSE_NEGATIVE_WEIGHT = 0.5


@dataclasses.dataclass(frozen=True)
class MinHashParams:
    """What a signature means and when two documents are near-duplicates. Plain values, so it pickles to
    workers and compares by value; the LSH layout (`bands` x `rows`) is derived from it."""

    threshold: float  # estimated Jaccard similarity of shingle sets at or above which a document is dropped
    # Hash functions per signature; cost grows linearly with it. 120 = 2^3*3*5 has 16 divisors, so some
    # bands x rows puts the S-curve's midpoint near any threshold; FineWeb's 112 (14x8) has none between
    # 0.72 and 0.86, so at 0.8 its best layout misses 42% of pairs at Jaccard 0.85 (120: 22%).
    num_perm: int = DEFAULT_NUM_PERM
    shingle_words: int = 5  # words per shingle (FineWeb: 5); a shorter document is one shingle
    seed: int = 0  # picks the hash functions; signatures compare only under the same seed

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"near-dedup threshold must be a number in (0, 1], got {self.threshold!r}")
        if not 0 < self.threshold <= 1:  # also rejects NaN
            raise ValueError(f"near-dedup threshold must be in (0, 1] (a Jaccard similarity), got {self.threshold}")
        for name in ("num_perm", "shingle_words"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"near-dedup {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"near-dedup seed must be an integer, got {self.seed!r}")

    @property
    def bands(self) -> int:
        return band_layout(self.threshold, self.num_perm)[0]

    @property
    def rows(self) -> int:
        return band_layout(self.threshold, self.num_perm)[1]

    @property
    def min_equal(self) -> int:
        """Equal signature positions needed for an estimated Jaccard >= threshold."""
        return math.ceil(self.threshold * self.num_perm - 1e-9)  # 1e-9: 0.7 * 120 is 84.00000000000001


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Chance that two documents of this Jaccard similarity share at least one band: 1 - (1 - s^r)^b."""
    return 1 - (1 - np.power(similarity, rows)) ** bands


@functools.lru_cache(maxsize=64)
def band_layout(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows == num_perm that minimises the weighted area of false positives
    (similarity below the threshold, yet a candidate) plus false negatives (above it, yet not) under the
    S-curve. Ties go to fewer rows. The midpoint of the chosen curve, (1/b)^(1/r), lands near the threshold."""
    similarity = np.linspace(0.0, 1.0, 2001)
    below = similarity < threshold
    best = None
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        probability = candidate_probability(similarity, bands, rows)
        false_positive = np.trapezoid(np.where(below, probability, 0.0), similarity)
        false_negative = np.trapezoid(np.where(below, 0.0, 1 - probability), similarity)
        error = _FALSE_POSITIVE_WEIGHT * false_positive + _FALSE_NEGATIVE_WEIGHT * false_negative
        if best is None or error < best[0]:
            best = (error, bands, rows)
    return best[1], best[2]


def _stable_uint64(label: str, count: int) -> np.ndarray:
    """`count` pseudo-random uint64 fixed forever by `label` (SHAKE-128), unlike numpy's Generator, whose
    streams NEP 19 lets change between numpy releases: a signature must not change with the numpy version."""
    return np.frombuffer(hashlib.shake_128(label.encode()).digest(8 * count), dtype="<u8").astype(np.uint64)


@functools.lru_cache(maxsize=16)
def hash_coefficients(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (num_perm,) uint64, of the hash functions h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 on
    32-bit shingle hashes x. This multiply-add-shift family is strongly universal (Dietzfelbinger 1996),
    as (a x + b) mod p is, but its mod 2^64 is numpy's own uint64 wrap-around: no overflow to guard
    against and no division, 2.4x faster than mod 2^32-5 here."""
    coefficients = _stable_uint64(f"llm.near_dedup minhash seed={seed}", 2 * num_perm)
    a, b = coefficients[:num_perm], coefficients[num_perm:]
    a.flags.writeable = b.flags.writeable = False
    return a, b


@functools.lru_cache(maxsize=16)
def _position_weights(shingle_words: int) -> np.ndarray:
    """Odd uint64 multipliers, one per word position in a shingle, so word order counts."""
    weights = _stable_uint64("llm.near_dedup shingle positions", shingle_words) | np.uint64(1)
    weights.flags.writeable = False  # cached and shared
    return weights


_SPLITMIX = tuple(np.uint64(c) for c in (30, 0xBF58476D1CE4E5B9, 27, 0x94D049BB133111EB, 31))
_SHIFT_32 = np.uint64(32)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, element-wise and in place: every output bit depends on every input bit."""
    shift_1, multiply_1, shift_2, multiply_2, shift_3 = _SPLITMIX
    x ^= x >> shift_1
    x *= multiply_1
    x ^= x >> shift_2
    x *= multiply_2
    x ^= x >> shift_3
    return x


def _word_hashes(words: list[str]) -> np.ndarray:
    """CRC-32 of each word's UTF-8 bytes, as uint64. zlib's CRC in C is the fastest deterministic hash
    reachable from Python here (twice blake2b's speed per call); each word is hashed once, not n times."""
    try:
        encoded = list(map(str.encode, words))
    except UnicodeEncodeError:  # a lone surrogate: clean drops such text, but a signature should not crash
        encoded = [word.encode("utf-8", "surrogatepass") for word in words]
    return np.fromiter(map(zlib.crc32, encoded), dtype=np.uint64, count=len(encoded))


def shingle_hashes(text: str, shingle_words: int) -> np.ndarray:
    """32-bit hashes (in uint64) of the word n-grams of `text`, one per position, repeats included.
    A text of fewer than `shingle_words` words is one shingle; a text with no word at all (empty, or only
    punctuation or symbols) is one shingle of its whole characters, so the set is never empty.

    A shingle hash mixes its words' CRC-32s with per-position weights mod 2^64 (vectorised), then keeps
    the top 32 bits of SplitMix64: two given shingles collide with chance about 2^-32, which moves a
    Jaccard estimate by far less than its sampling error (about 0.04 at num_perm 120)."""
    words = _WORD.findall(text.lower()) or [text]
    word_hashes = _word_hashes(words)
    span = min(shingle_words, len(words))
    count = len(words) - span + 1
    weights = _position_weights(shingle_words)
    hashes = word_hashes[:count] * weights[0]
    for position in range(1, span):
        hashes += word_hashes[position : position + count] * weights[position]
    return _mix64(hashes) >> _SHIFT_32


def signature(text: str, params: MinHashParams) -> np.ndarray:
    """The MinHash signature of `text`: (num_perm,) uint32, a pure function of (text, params)."""
    a, b = hash_coefficients(params.num_perm, params.seed)
    shingles = shingle_hashes(text, params.shingle_words)
    least = np.full(params.num_perm, _U64_MAX, dtype=np.uint64)
    for start in range(0, len(shingles), SHINGLE_BLOCK):
        block = np.multiply(shingles[start : start + SHINGLE_BLOCK, None], a)  # (block, num_perm), mod 2^64
        block += b
        np.minimum(least, block.min(axis=0), out=least)
    # The shift is monotone, so it commutes with the min and is done once, on num_perm values.
    return (least >> _SHIFT_32).astype(np.uint32)


def estimated_jaccard(first: np.ndarray, second: np.ndarray) -> float:
    """Share of positions where two signatures agree: an unbiased estimate of the shingle Jaccard."""
    return float(np.mean(first == second))


class NearDuplicateIndex:
    """Signatures of the documents kept so far, and an LSH table per band to find candidates among them.

    Memory per kept document: its signature (4 * num_perm bytes, 480 at 120; up to twice that while the
    array has room to grow) plus one entry in each of `bands` dicts, about 80 bytes: the band key (a 64-bit
    Python int, 36 bytes) and a dict slot with the dict's spare room; the document's number is one int
    shared by all bands. Measured at num_perm 120 with 131k kept: 1.27 KB at threshold 0.8 (10 bands),
    2.03 KB at 0.6 (20 bands); benchmarks/near_dedup_recall.py prints it. Decisions depend only on the
    signatures and their order.
    """

    def __init__(self, params: MinHashParams) -> None:
        self.params = params
        self.bands, self.rows = params.bands, params.rows
        # Band key = sum of a band's values times fixed 64-bit weights, mod 2^64: one int instead of the
        # band's bytes. A collision between different bands is rare (< 2^-32) and the Jaccard check catches it.
        self._band_weights = _stable_uint64("llm.near_dedup band keys", self.rows) | np.uint64(1)
        # key -> number of the first kept document with it, or a list when several kept documents share it.
        self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._signatures = np.empty((1024, params.num_perm), dtype=np.uint32)  # grows by doubling
        self._kept = 0

    def __len__(self) -> int:
        """Documents kept (indexed) so far."""
        return self._kept

    def is_duplicate(self, sig: np.ndarray) -> bool:
        """True if `sig` shares an LSH band with an earlier kept document AND their estimated Jaccard is at
        least the threshold; otherwise records `sig` as kept and returns False."""
        keys = self._band_keys(sig)
        if self._match(sig, keys) is not None:
            return True
        self._add(sig, keys)
        return False

    def find(self, sig: np.ndarray) -> int | None:
        """Number (0, 1, ... in order kept) of the earliest kept document `sig` is a near-duplicate of, or
        None. Records nothing."""
        return self._match(sig, self._band_keys(sig))

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        if sig.shape != (self.params.num_perm,) or sig.dtype != np.uint32:
            raise ValueError(
                f"signature must be ({self.params.num_perm},) uint32 for these MinHash params, "
                f"got {sig.shape} {sig.dtype}"
            )
        rows = sig.reshape(self.bands, self.rows).astype(np.uint64)  # (bands, rows)
        return (rows * self._band_weights).sum(axis=1, dtype=np.uint64).tolist()  # sum wraps mod 2^64

    def _match(self, sig: np.ndarray, keys: list[int]) -> int | None:
        candidates: set[int] = set()
        for table, key in zip(self._tables, keys, strict=True):
            found = table.get(key)
            if found is None:
                continue
            if isinstance(found, int):
                candidates.add(found)
            else:
                candidates.update(found)
        if not candidates:
            return None
        numbers = np.fromiter(sorted(candidates), dtype=np.int64, count=len(candidates))
        equal = np.count_nonzero(self._signatures[numbers] == sig, axis=1)  # (candidates,)
        close = numbers[equal >= self.params.min_equal]
        return int(close[0]) if len(close) else None

    def _add(self, sig: np.ndarray, keys: list[int]) -> None:
        number = self._kept
        if number == len(self._signatures):
            grown = np.empty((2 * number, self.params.num_perm), dtype=np.uint32)
            grown[:number] = self._signatures
            self._signatures = grown
        self._signatures[number] = sig
        for table, key in zip(self._tables, keys, strict=True):
            found = table.get(key)
            if found is None:
                table[key] = number
            elif isinstance(found, int):
                table[key] = [found, number]
            else:
                found.append(number)
        self._kept += 1
