"""MinHash signatures and the LSH index of llm/near_dedup.py: determinism, estimate quality, recall on a
synthetic corpus, edge cases, the band layout and parameter checks."""

import hashlib
import re
import subprocess
import sys

import numpy as np
import pytest

import llm.near_dedup as near_dedup
from llm.near_dedup import (
    MinHashParams,
    NearDuplicateIndex,
    band_layout,
    candidate_probability,
    estimated_jaccard,
    hash_coefficients,
    shingle_hashes,
    signature,
)
from tests.conftest import ROOT

TEXT = "The quick brown fox jumps over the lazy dog, then naps under the old oak tree by the river bank."


def random_words(rng: np.random.Generator, vocab: list[str], count: int) -> list[str]:
    return [vocab[i] for i in rng.integers(0, len(vocab), count)]


def make_vocab(rng: np.random.Generator, size: int = 20_000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(letters[rng.integers(0, 26, rng.integers(3, 10))]) for _ in range(size)]


def edit_words(rng: np.random.Generator, words: list[str], vocab: list[str], rate: float) -> list[str]:
    """A near-copy: round(rate * len) edits, each a replacement, insertion or deletion at a random place."""
    words = list(words)
    for _ in range(max(1, round(rate * len(words)))):
        op, at = rng.integers(0, 3), int(rng.integers(0, len(words)))
        if op == 0:
            words[at] = vocab[rng.integers(0, len(vocab))]
        elif op == 1:
            words.insert(at, vocab[rng.integers(0, len(vocab))])
        else:
            del words[at]
    return words


def true_jaccard(first: str, second: str, n: int = 5) -> float:
    """Exact Jaccard of word n-gram sets, from the strings (independent of the module's hashing)."""

    def shingles(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}

    a, b = shingles(first), shingles(second)
    return len(a & b) / len(a | b)


def test_signature_shape_dtype_and_determinism() -> None:
    params = MinHashParams(threshold=0.8)
    sig = signature(TEXT, params)
    assert sig.shape == (params.num_perm,) and sig.dtype == np.uint32
    assert np.array_equal(sig, signature(TEXT, params))
    assert estimated_jaccard(sig, signature(TEXT, MinHashParams(threshold=0.5))) == 1.0  # threshold: not in sig
    assert not np.array_equal(sig, signature(TEXT, MinHashParams(threshold=0.8, seed=1)))


def test_signature_is_the_same_in_a_fresh_process() -> None:
    """No salted hash(): another interpreter (another PYTHONHASHSEED) gives the same bytes."""
    code = (
        "import hashlib; from llm.near_dedup import MinHashParams, signature; "
        f"print(hashlib.sha256(signature({TEXT!r}, MinHashParams(0.8)).tobytes()).hexdigest())"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    here = hashlib.sha256(signature(TEXT, MinHashParams(0.8)).tobytes()).hexdigest()
    assert done.stdout.strip() == here


def test_signature_matches_a_big_integer_reference() -> None:
    """The uint64 arithmetic is exactly ((a x + b) mod 2^64) >> 32, minimised over shingles."""
    params = MinHashParams(threshold=0.8, num_perm=8)
    a, b = hash_coefficients(params.num_perm, params.seed)
    shingles = [int(x) for x in shingle_hashes(TEXT, params.shingle_words)]
    reference = [min(((int(ai) * x + int(bi)) % 2**64) >> 32 for x in shingles) for ai, bi in zip(a, b, strict=True)]
    assert signature(TEXT, params).tolist() == reference


def test_long_documents_are_hashed_in_blocks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    text = " ".join(random_words(rng, make_vocab(rng, 500), 3000))
    params = MinHashParams(threshold=0.8)
    whole = signature(text, params)
    monkeypatch.setattr(near_dedup, "SHINGLE_BLOCK", 7)
    assert np.array_equal(signature(text, params), whole)


def test_case_punctuation_and_spacing_do_not_count() -> None:
    params = MinHashParams(threshold=0.8)
    messy = "  the QUICK brown fox -- jumps over the lazy dog; then naps under the old oak tree by the river bank!!"
    assert estimated_jaccard(signature(TEXT, params), signature(messy, params)) == 1.0


@pytest.mark.parametrize("shared_fraction", [0.2, 0.5, 0.8])
def test_estimate_is_close_to_the_true_shingle_jaccard(shared_fraction: float) -> None:
    """Two 400-word documents sharing a run of words (Jaccard 0.1, 0.33, 0.66): the estimate is within 0.1
    of the exact Jaccard (its standard deviation is at most 0.046 at num_perm 120)."""
    rng = np.random.default_rng(int(shared_fraction * 10))
    vocab = make_vocab(rng)
    shared = random_words(rng, vocab, int(400 * shared_fraction))
    first = " ".join(shared + random_words(rng, vocab, 400 - len(shared)))
    second = " ".join(random_words(rng, vocab, 400 - len(shared)) + shared)
    params = MinHashParams(threshold=0.8)
    exact = true_jaccard(first, second)
    assert abs(estimated_jaccard(signature(first, params), signature(second, params)) - exact) < 0.1


def test_recall_on_a_synthetic_corpus() -> None:
    """300 distinct documents, then a near-copy of each with 3% of words replaced, inserted or deleted:
    each edit changes the 5 shingles over it, so about (1-0.03)^5 = 86% of shingles survive and the
    expected Jaccard is 0.86 / (2 - 0.86) = 0.75, well above the 0.6 threshold. Also a "related" document
    per original that shares half of it (Jaccard about 0.33): a few collide in a band with their original,
    and the Jaccard check must keep them."""
    rng = np.random.default_rng(0)
    vocab = make_vocab(rng)
    originals = [random_words(rng, vocab, int(rng.integers(200, 401))) for _ in range(300)]
    copies = [edit_words(rng, words, vocab, 0.03) for words in originals]
    related = [words[: len(words) // 2] + random_words(rng, vocab, len(words) // 2) for words in originals]
    exact = [true_jaccard(" ".join(o), " ".join(c)) for o, c in zip(originals, copies, strict=True)]
    assert 0.7 < np.mean(exact) < 0.8

    params = MinHashParams(threshold=0.6)
    index = NearDuplicateIndex(params)
    drops = [index.is_duplicate(signature(" ".join(words), params)) for words in originals + related + copies]
    assert not any(drops[: 2 * len(originals)]), "a distinct document was dropped"
    missed = drops[2 * len(originals) :].count(False)
    assert 1 - missed / len(copies) >= 0.95  # recall
    assert len(index) == 2 * len(originals) + missed  # dropped documents are not indexed


def test_decisions_are_deterministic() -> None:
    rng = np.random.default_rng(1)
    vocab = make_vocab(rng, 2000)
    originals = [random_words(rng, vocab, 100) for _ in range(40)]
    stream = [" ".join(w) for w in originals] + [" ".join(edit_words(rng, w, vocab, 0.05)) for w in originals]
    params = MinHashParams(threshold=0.5, seed=7)

    def decisions() -> list[bool]:
        index = NearDuplicateIndex(params)
        return [index.is_duplicate(signature(text, params)) for text in stream]

    first = decisions()
    assert first == decisions()
    assert not any(first[:40]) and sum(first[40:]) >= 36


def band_of(params: MinHashParams, band: int) -> slice:
    """Positions of one LSH band in a signature."""
    return slice(band * params.rows, (band + 1) * params.rows)


def test_a_band_collision_alone_does_not_drop() -> None:
    """Shares one band exactly, differs elsewhere: a candidate, but its estimated Jaccard is low."""
    params = MinHashParams(threshold=0.8)
    rng = np.random.default_rng(0)
    first = rng.integers(0, 2**32, params.num_perm, dtype=np.uint32)
    second = rng.integers(0, 2**32, params.num_perm, dtype=np.uint32)
    second[band_of(params, 3)] = first[band_of(params, 3)]
    index = NearDuplicateIndex(params)
    assert not index.is_duplicate(first)
    assert not index.is_duplicate(second)
    assert index.is_duplicate(first.copy()) and len(index) == 2


def test_only_kept_documents_are_matched() -> None:
    """B is close to A and dropped; C is close to B but not to A: C is kept, since B was never indexed."""
    params = MinHashParams(threshold=0.8)  # 10 bands of 12 rows; 96 equal positions needed
    assert (params.bands, params.rows, params.min_equal) == (10, 12, 96)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**32, params.num_perm, dtype=np.uint32)
    b, c = a.copy(), a.copy()
    b[band_of(params, 0)] += 1  # 108 of 120 equal to A
    c[band_of(params, 0)] += 1
    c[band_of(params, 1)] += 1
    c[band_of(params, 2)] += 1  # 96 equal to B, 84 to A
    index = NearDuplicateIndex(params)
    assert [index.is_duplicate(sig) for sig in (a, b, c)] == [False, True, False]
    assert index.find(c) == 1  # now C itself is kept
    index = NearDuplicateIndex(params)
    assert [index.is_duplicate(sig) for sig in (b, a, c)] == [False, True, True]  # B kept first: C matches it


def test_short_and_wordless_documents() -> None:
    params = MinHashParams(threshold=0.8)
    short = signature("Hello, world!", params)  # two words: one shingle
    assert short.shape == (params.num_perm,)
    assert np.array_equal(short, signature("hello   WORLD", params))
    assert estimated_jaccard(short, signature("hello there", params)) < 0.1
    assert len(shingle_hashes("one two three four five six", 5)) == 2
    assert len(shingle_hashes("one two", 5)) == 1
    # No word at all: the whole text is one shingle, so symbol-only texts still differ from each other.
    assert estimated_jaccard(signature("!!!", params), signature("???", params)) < 0.1
    empty = signature("", params)  # clean never passes empty text; it is defined and does not crash
    assert np.array_equal(empty, signature("", params)) and len(shingle_hashes("", 5)) == 1
    assert signature("lone \ud800 surrogate", params).shape == (params.num_perm,)


@pytest.mark.parametrize("threshold", [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
def test_band_layout_centres_the_s_curve_on_the_threshold(threshold: float) -> None:
    params = MinHashParams(threshold=threshold)
    bands, rows = params.bands, params.rows
    assert bands * rows == params.num_perm
    assert 0.25 <= candidate_probability(threshold, bands, rows) <= 0.75
    assert candidate_probability(threshold - 0.15, bands, rows) < 0.2
    assert candidate_probability(min(threshold + 0.1, 1.0), bands, rows) > 0.85


def test_band_layout_extremes() -> None:
    assert band_layout(1.0, 120) == (1, 120)  # only identical signatures can be candidates
    assert band_layout(0.01, 120) == (120, 1)
    assert band_layout(0.8, 7) in {(1, 7), (7, 1)}  # a prime: one of the two trivial layouts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": -0.5}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "0.8"}, "threshold"),
        ({"threshold": 0.8, "num_perm": 0}, "num_perm"),
        ({"threshold": 0.8, "num_perm": 12.0}, "num_perm"),
        ({"threshold": 0.8, "shingle_words": 0}, "shingle_words"),
        ({"threshold": 0.8, "seed": None}, "seed"),
    ],
)
def test_params_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MinHashParams(**kwargs)


def test_index_rejects_a_signature_of_other_params() -> None:
    index = NearDuplicateIndex(MinHashParams(threshold=0.8))
    with pytest.raises(ValueError, match="signature must be"):
        index.is_duplicate(signature(TEXT, MinHashParams(threshold=0.8, num_perm=64)))
    with pytest.raises(ValueError, match="signature must be"):
        index.is_duplicate(signature(TEXT, MinHashParams(threshold=0.8)).astype(np.uint64))


def test_the_index_grows_past_its_initial_capacity() -> None:
    params = MinHashParams(threshold=0.9)
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, (2100, params.num_perm), dtype=np.uint32)
    index = NearDuplicateIndex(params)
    assert not any(index.is_duplicate(sig) for sig in sigs)
    assert all(index.find(sig) == number for number, sig in enumerate(sigs))
