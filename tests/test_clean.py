import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import llm.clean
from llm.clean import NEUTRALISER, CleanStats, clean_corpus, clean_text, strip_gutenberg
from llm.config import EOT
from llm.configs.clean import CleanConfig
from llm.documents import iter_documents
from llm.errors import InputError
from llm.fetch import supported
from llm.raw_formats import SUFFIXES
from llm.readers import READERS, reader_for

SPECIAL = (EOT,)


def clean(text: str) -> str:
    return clean_text(text, SPECIAL, CleanStats())


def test_bom_is_stripped():
    assert clean("\ufeffHello") == "Hello"


def test_newlines_are_normalised():
    assert clean("a\r\nb\rc\nd") == "a\nb\nc\nd"


def test_text_is_nfc():
    assert clean("Cafe\u0301") == "Caf\u00e9"


def test_control_characters_removed_but_tab_and_newline_kept():
    stats = CleanStats()
    assert clean_text("a\x00b\x07c\td\ne\x1bf\x7fg\x85h", SPECIAL, stats) == "abc\td\nefgh"
    assert stats.control_chars_removed == 5


def test_gutenberg_header_and_footer_removed():
    text = (
        "The Project Gutenberg eBook of Hamlet\nlicense blah\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "To be, or not to be.\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nmore license\n"
    )
    body, stripped = strip_gutenberg(text)
    assert stripped and body.strip() == "To be, or not to be."
    assert strip_gutenberg("plain text, no markers") == ("plain text, no markers", False)


def test_literal_special_token_is_neutralised_and_counted():
    stats = CleanStats()
    out = clean_text(f"one {EOT} two {EOT}", SPECIAL, stats)
    assert EOT not in out
    assert out.replace(NEUTRALISER, "") == f"one {EOT} two {EOT}"
    assert stats.special_tokens_neutralised == 2


def write_parquet(path, texts):
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path)


@pytest.fixture
def messy_raw(tmp_path):
    """A raw folder with every kind of bad input the issue names, and the good documents among them."""
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    good = {
        "good.txt": "A good plain document with enough characters to pass the filter.",
        "bom.txt": "\ufeffA document that starts with a byte order mark and is otherwise fine.",
        "crlf.md": "Line one of a Windows file,\r\nline two of a Windows file, long enough.",
        "sub/nested.txt": f"A document typing the token {EOT} in its text, which must stay plain text.",
    }
    for name, text in good.items():
        (raw / name).write_bytes(text.encode())
    (raw / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    (raw / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e, encoded in Latin-1, not UTF-8".encode("latin-1"))
    (raw / "empty.txt").write_bytes(b"")
    (raw / "short.txt").write_bytes(b"tiny")
    (raw / "dup.txt").write_bytes(good["good.txt"].encode() + b"\r\n")  # same after normalisation
    (raw / "big.txt").write_bytes(b"x" * (3 << 20))  # one 3 MB line: longer than any read buffer, kept whole
    lines = [
        json.dumps({"text": "First JSONL document, a perfectly reasonable line of text here."}),
        '{"text": "malformed, the closing brace is missing"',
        json.dumps({"no_text": "a record without the field"}),
        "",
        json.dumps({"text": "Second JSONL document, also a perfectly reasonable line of text."}),
    ]
    (raw / "docs.jsonl").write_text("\n".join(lines) + "\n")
    write_parquet(raw / "table.parquet", ["A Parquet row that is long enough to be kept by the filter.", None])
    pq.write_table(pa.table({"body": ["wrong column name"]}), raw / "nocol.parquet")
    (raw / "notes.csv").write_text("a,b\n1,2\n")
    return raw


def test_messy_folder_is_cleaned_and_every_drop_reported(messy_raw, tmp_path):
    out = tmp_path / "clean"
    stats = clean_corpus(messy_raw, out, CleanConfig(min_chars=20), SPECIAL)

    docs = dict(iter_documents(out))
    # dup.txt and good.txt are equal after normalisation: the first in sorted order is kept.
    expected_ids = {"dup.txt", "bom.txt", "crlf.md", "sub/nested.txt", "big.txt", "docs.jsonl:1",
                    "docs.jsonl:5", "table.parquet:0"}
    assert set(docs) == expected_ids, "every good document is kept, nothing else"
    assert docs["bom.txt"].startswith("A document")
    assert "\r" not in docs["crlf.md"]
    assert EOT not in docs["sub/nested.txt"]
    assert len(docs["big.txt"]) == 3 << 20

    assert stats.dropped == {
        "binary": 1, "invalid_utf8": 1, "empty": 1, "too_short": 1, "duplicate": 1, "malformed_jsonl": 1,
        "missing_text": 2, "missing_text_column": 1, "unsupported_file": 1,
    }
    assert stats.documents_out == len(expected_ids)
    assert stats.documents_in == stats.documents_out + sum(stats.dropped.values())
    assert stats.special_tokens_neutralised == 1
    assert {f["file"] for f in stats.bad_files} >= {"binary.txt", "latin1.txt", "docs.jsonl:2", "notes.csv"}
    assert stats.bytes_out == sum(len(text.encode()) for text in docs.values())


def test_output_shards_have_the_schema_and_roll_over(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(40):
        (raw / f"doc{i:02d}.txt").write_text(f"document {i} " + "word " * 60_000)
    out = tmp_path / "clean"
    stats = clean_corpus(raw, out, CleanConfig(min_chars=1, shard_mb=1), SPECIAL)
    shards = sorted(out.glob("part-*.parquet"))
    assert stats.shards == len(shards) > 1
    assert pq.read_schema(shards[0]).names == ["id", "source", "text"]
    assert [doc_id for doc_id, _ in iter_documents(out)] == [f"doc{i:02d}.txt" for i in range(40)]


def test_clean_replaces_output_whole_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        (raw / f"{i}.txt").write_text(f"document {i}, long enough to keep around")
    out = tmp_path / "clean"
    clean_corpus(raw, out, CleanConfig(min_chars=1), SPECIAL)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(InputError, match="missing"):
        clean_corpus(tmp_path / "missing", out, CleanConfig(min_chars=1), SPECIAL)
    calls = []

    def fail_on_third(text, *args):
        calls.append(text)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return text

    monkeypatch.setattr(llm.clean, "clean_text", fail_on_third)
    with pytest.raises(RuntimeError):
        clean_corpus(raw, out, CleanConfig(min_chars=1), SPECIAL)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def jsonl_bytes(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()


def test_compressed_jsonl_is_read_like_plain_jsonl_and_damage_is_counted(tmp_path):
    import gzip

    import zstandard

    texts = [f"Document number {i} of the compressed files, long enough to be kept." for i in range(40)]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_bytes(jsonl_bytes(texts[:10]))
    (raw / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(texts[10:20])))
    (raw / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(texts[20:30])))
    # Cut short: gzip's stream ends before its end-of-stream marker, after the first lines decompress.
    whole = gzip.compress(jsonl_bytes(texts[30:40]) * 50, compresslevel=1)
    (raw / "d.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (raw / "e.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"not a zstd frame at all" * 4)

    stats = clean_corpus(raw, tmp_path / "clean", CleanConfig(min_chars=20), SPECIAL)
    docs = dict(iter_documents(tmp_path / "clean"))
    assert [docs[f"b.jsonl.gz:{i}"] for i in range(1, 11)] == texts[10:20]
    assert [docs[f"c.jsonl.zst:{i}"] for i in range(1, 11)] == texts[20:30]
    kept_from_cut = [text for doc_id, text in docs.items() if doc_id.startswith("d.jsonl.gz:")]
    assert kept_from_cut == texts[30:40], "the lines before the damage are kept (later copies are duplicates)"
    assert stats.dropped["corrupt_compressed"] == 2
    assert {f["file"].split(":")[0] for f in stats.bad_files if f["reason"] == "corrupt_compressed"} == {
        "d.jsonl.gz", "e.jsonl.zst"}
    assert stats.documents_in == stats.documents_out + sum(stats.dropped.values())


def test_near_duplicates_are_dropped_only_when_asked_and_counted(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(5000)]
    raw = tmp_path / "raw"
    raw.mkdir()
    originals = [list(rng.choice(vocabulary, size=300)) for _ in range(20)]
    for i, words in enumerate(originals):
        (raw / f"a{i:02d}.txt").write_text(" ".join(words))
    for i in range(0, 20, 4):  # five near-copies: 3 of 300 words changed
        words = list(originals[i])
        for position in rng.choice(300, size=3, replace=False):
            words[position] = "changed"
        (raw / f"b{i:02d}.txt").write_text(" ".join(words))

    off = clean_corpus(raw, tmp_path / "off", CleanConfig(min_chars=20), SPECIAL)
    on = clean_corpus(raw, tmp_path / "on", CleanConfig(min_chars=20, near_dedup=0.8), SPECIAL)
    assert off.documents_out == 25 and off.near_duplicates == 0
    assert on.documents_out == 20 and on.near_duplicates == 5 and on.dropped == {"near_duplicate": 5}
    assert {doc_id for doc_id, _ in iter_documents(tmp_path / "on")} == {f"a{i:02d}.txt" for i in range(20)}
    assert on.to_dict()["near_duplicates"] == 5


def test_clean_reads_every_file_type_fetch_brings():
    assert set(READERS) == set(SUFFIXES.values()), "a reader for each format of the suffix table, and no other"
    names = [f"doc{suffix}" for suffix in SUFFIXES] + [f"DOC{suffix.upper()}" for suffix in SUFFIXES] + [
        "a.gz", "a.zst", "a.json", "a.csv", "a.txt.bak", "jsonl", "a.parquet.tmp", "README"]
    for name in names:
        assert supported(name) == (reader_for(name) is not None), f"fetch and clean disagree on {name}"
    assert all(supported(f"doc{suffix}") for suffix in SUFFIXES) and not supported("a.csv")


def test_the_metrics_keep_their_keys_and_a_duplicate_is_counted_once(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    text = "the same words in the same order, long enough to keep"
    (raw / "a.txt").write_text(text)
    (raw / "b.txt").write_text(text)
    (raw / "c.txt").write_text(text + " and then some more")
    metrics = clean_corpus(raw, tmp_path / "clean", CleanConfig(min_chars=10), SPECIAL).to_dict()
    assert set(metrics) == {"bad_files", "bytes_in", "bytes_out", "control_chars_removed", "documents_dropped",
                            "documents_in", "documents_out", "dropped", "dropped_bytes", "duplicates", "files_in",
                            "gutenberg_stripped", "near_duplicates", "shards", "special_tokens_neutralised"}
    assert metrics["duplicates"] == metrics["dropped"]["duplicate"] == metrics["documents_dropped"] == 1
    assert metrics["near_duplicates"] == 0 and metrics["documents_out"] == 2


LIMIT = 1000  # MAX_DOCUMENT_BYTES for these tests: the real limit's files would take seconds to write


def jsonl_line(nbytes: int) -> bytes:
    """A JSONL line of exactly `nbytes` bytes, newline not counted."""
    return json.dumps({"text": "x" * (nbytes - len(json.dumps({"text": ""})))}).encode()


def write_sized(raw, suffix: str, sizes: list[int]) -> None:
    """Documents whose raw form (a file, a JSONL line without its newline, a Parquet value) has these sizes."""
    import gzip

    import zstandard

    if suffix == ".txt":
        for i, size in enumerate(sizes):
            (raw / f"{i}.txt").write_bytes(b"%d " % i + b"y" * (size - len(b"%d " % i)))
        return
    if suffix == ".parquet":
        write_parquet(raw / "docs.parquet", [f"{i} " + "y" * (size - len(f"{i} ")) for i, size in enumerate(sizes)])
        return
    lines = b"".join(jsonl_line(size)[:-5] + b"%03d\"}" % i + b"\n" for i, size in enumerate(sizes))
    compress = {".jsonl": bytes, ".jsonl.gz": gzip.compress, ".jsonl.zst": zstandard.ZstdCompressor().compress}
    (raw / f"docs{suffix}").write_bytes(compress[suffix](lines))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_a_document_over_the_size_limit_is_dropped_and_counted_in_every_format(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(llm.readers, "MAX_DOCUMENT_BYTES", LIMIT)
    raw = tmp_path / "raw"
    raw.mkdir()
    sizes = [200, LIMIT, LIMIT + 1, 300, 50 * LIMIT, LIMIT - 1]
    write_sized(raw, suffix, sizes)
    stats = clean_corpus(raw, tmp_path / "clean", CleanConfig(min_chars=1), SPECIAL)
    docs = list(iter_documents(tmp_path / "clean"))
    kept = [size for size in sizes if size <= LIMIT]
    assert len(docs) == len(kept) and stats.documents_out == len(kept), "those within the limit, at it included"
    assert stats.dropped == {"too_long": 2}
    newline = 1 if "jsonl" in suffix else 0  # a line's bytes count its newline, as bytes_in does
    assert stats.dropped_bytes["too_long"] == LIMIT + 1 + 50 * LIMIT + 2 * newline
    assert stats.bytes_in == sum(sizes) + newline * len(sizes)
    assert len([f for f in stats.bad_files if f["reason"] == "too_long"]) == 2
    assert stats.documents_in == stats.documents_out + sum(stats.dropped.values())


def test_an_over_long_jsonl_line_is_skipped_without_being_held_in_memory(tmp_path, monkeypatch):
    import gzip
    import tracemalloc

    from llm.readers import read_jsonl_file

    monkeypatch.setattr(llm.readers, "MAX_DOCUMENT_BYTES", 1 << 20)
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:  # 64 MB of one line, written a megabyte at a time
        f.write(b'{"text": "')
        for _ in range(64):
            f.write(b"a" * (1 << 20))
        f.write(b'"}\n' + jsonl_line(100) + b"\n")
    stats = CleanStats()
    tracemalloc.start()
    try:
        docs = list(read_jsonl_file(path, path.name, stats))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [doc.id for doc in docs] == ["bomb.jsonl.gz:2"] and stats.dropped == {"too_long": 1}
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MB held to read a 64 MB line"
