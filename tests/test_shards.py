import dataclasses
import json
import re

import numpy as np
import pytest

from llm.errors import InputError
from llm.fileio import sha256_file
from llm.shards import (
    HEADER_BYTES,
    ShardWriter,
    SplitMeta,
    TokensMeta,
    make_header,
    open_shard,
    read_header,
    read_meta,
    token_dtype,
    write_meta,
)


@pytest.mark.parametrize(("vocab_size", "dtype", "magic", "version"), [(50_257, "<u2", 20240520, 1),
                                                                       (65_536, "<u2", 20240520, 1),
                                                                       (65_537, "<u4", 20240801, 7)])
def test_header_and_memmap_round_trip(tmp_path, vocab_size, dtype, magic, version):
    assert token_dtype(vocab_size) == np.dtype(dtype)
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=10_000).astype(dtype)
    writer = ShardWriter(tmp_path, "train", token_dtype(vocab_size), shard_tokens=1 << 20)
    writer.write(tokens)
    [path] = writer.close()

    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [magic, version, tokens.size]
    assert not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + tokens.size * np.dtype(dtype).itemsize
    loaded = open_shard(path, vocab_size=vocab_size)
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, tokens)


def test_shards_respect_the_size_limit_and_concatenate_back(tmp_path):
    tokens = np.arange(1000, dtype="<u2")
    writer = ShardWriter(tmp_path, "val", np.dtype("<u2"), shard_tokens=300)
    for start in range(0, 1000, 170):  # writes that straddle shard boundaries
        writer.write(tokens[start : start + 170])
    paths = writer.close()
    assert [p.name for p in paths] == [f"val_{i:06d}.bin" for i in range(4)]
    assert [read_header(p)[1] for p in paths] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate([open_shard(p) for p in paths]), tokens)


def test_an_empty_split_still_gets_a_valid_shard(tmp_path):
    [path] = ShardWriter(tmp_path, "val", np.dtype("<u2"), 100).close()
    assert read_header(path)[1] == 0
    assert open_shard(path).size == 0


@pytest.fixture
def good_shard(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.dtype("<u2"), 1000)
    writer.write(np.arange(100, dtype="<u2"))
    return writer.close()[0]


def corrupt(path, data: bytes, offset: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_shard_is_rejected_with_its_name(good_shard):
    with open(good_shard, "r+b") as f:
        f.truncate(HEADER_BYTES + 150)
    with pytest.raises(InputError, match=rf"{good_shard.name}.*truncated"):
        open_shard(good_shard)


def test_short_header_is_rejected(good_shard):
    good_shard.write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="shorter than its 1024-byte header"):
        read_header(good_shard)


def test_bad_magic_and_version_are_rejected(good_shard):
    corrupt(good_shard, np.array([12345], "<i4").tobytes())
    with pytest.raises(InputError, match="magic 12345"):
        open_shard(good_shard)
    corrupt(good_shard, make_header(np.dtype("<u2"), 100)[:4] + np.array([7], "<i4").tobytes())
    with pytest.raises(InputError, match="version 7"):
        open_shard(good_shard)


def test_ids_beyond_the_vocab_are_rejected(good_shard):
    assert open_shard(good_shard, vocab_size=100).size == 100
    with pytest.raises(InputError, match="id 99 is not below vocab size 99"):
        open_shard(good_shard, vocab_size=99)


def test_missing_shard_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        open_shard(tmp_path / "nope.bin")


def valid_meta() -> TokensMeta:
    split = SplitMeta(documents=2, tokens=10, bytes=30, shards=("train_000000.bin",))
    return TokensMeta(vocab_size=300, dtype="uint16", eot_id=0, tokenizer_sha256="ab" * 32, shard_tokens=100,
                      splits={"train": split, "val": dataclasses.replace(split, shards=("val_000000.bin",))})


def write_valid_tokens(tokens_dir) -> None:
    """valid_meta() and the shards it describes: 10 tokens per split, 2 documents, each starting with EOT."""
    for split in ("train", "val"):
        writer = ShardWriter(tokens_dir, split, np.dtype("<u2"), shard_tokens=100)
        writer.write(np.array([0, 5, 6, 7, 8, 0, 9, 10, 11, 12]))
        writer.close()
    write_meta(tokens_dir, valid_meta())


def test_meta_round_trips_through_its_writer_and_reader(tmp_path):
    write_valid_tokens(tmp_path)
    assert read_meta(tmp_path) == valid_meta()
    assert read_meta(tmp_path).shard_paths(tmp_path, "val") == [tmp_path / "val_000000.bin"]


@pytest.mark.parametrize(("edit", "named"), [
    (lambda meta: meta.clear(), "splits"),
    (lambda meta: meta.pop("vocab_size"), "vocab_size"),
    (lambda meta: meta.update(eot_id="0"), "eot_id"),
    (lambda meta: meta.update(shard_tokens=-1), "shard_tokens"),
    (lambda meta: meta["splits"].pop("val"), "splits.val"),
    (lambda meta: meta["splits"]["train"].update(tokens=1.5), "splits.train.tokens"),
    (lambda meta: meta["splits"]["val"].update(shards=["../escape.bin"]), "splits.val.shards"),
    (lambda meta: meta.update(dtype="uint32"), "dtype"),
    # Counts that disagree with the shards (training's bits per byte is computed from them).
    (lambda meta: meta["splits"]["train"].update(tokens=11), "field splits.train.tokens says 11, but its shards' "
                                                             "headers hold 10"),
    (lambda meta: meta["splits"]["val"].update(tokens=100_000), "field splits.val.tokens"),
    (lambda meta: meta["splits"]["val"].update(documents=11), "field splits.val.documents"),
    (lambda meta: meta["splits"]["val"].update(bytes=7), "field splits.val.bytes says 7, fewer than its 8 text tokens"),
    (lambda meta: meta["splits"]["train"].update(bytes=0), "field splits.train.bytes"),
])
def test_a_damaged_meta_is_an_input_error_naming_the_field(tmp_path, edit, named):
    write_valid_tokens(tmp_path)
    raw = json.loads((tmp_path / "meta.json").read_text())
    edit(raw)
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match=re.escape(named)) as error:
        read_meta(tmp_path)
    assert "meta.json" in str(error.value) and "\n" not in str(error.value)


def test_a_shard_that_meta_lists_but_is_missing_or_of_another_dtype_is_refused_naming_it(tmp_path):
    write_valid_tokens(tmp_path)
    (tmp_path / "val_000000.bin").unlink()
    with pytest.raises(InputError, match="val_000000.bin: cannot read token shard"):
        read_meta(tmp_path)
    writer = ShardWriter(tmp_path, "val", np.dtype("<u4"), shard_tokens=100)
    writer.write(np.arange(10))
    writer.close()
    with pytest.raises(InputError, match="val_000000.bin: uint32 tokens, but .*meta.json says uint16"):
        read_meta(tmp_path)


def test_shards_from_another_tokenizer_are_refused(tmp_path, sample_tokenizer_path):
    meta = dataclasses.replace(valid_meta(), tokenizer_sha256=sha256_file(sample_tokenizer_path))
    meta.check_tokenizer(tmp_path, sample_tokenizer_path)
    other = tmp_path / "other.json"
    other.write_text(sample_tokenizer_path.read_text() + " ")
    with pytest.raises(InputError, match="another tokenizer"):
        meta.check_tokenizer(tmp_path, other)
