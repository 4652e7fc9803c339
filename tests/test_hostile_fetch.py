"""fetch against hostile sources (issue 31): a store that accepts and never answers, links out of the corpus
folder, file names that are not UTF-8, and damaged manifests. Each case ends in a result or in one line naming
the URL or file."""

import http.server
import json
import os
import random
import socket
import threading
import time

import fsspec
import pytest

from llm import remote
from llm.errors import InputError
from llm.fetch import fetch
from llm.manifest import Manifest, ManifestFile, read_manifest, write_manifest
from tests.conftest import run_stage, write_params

TIMEOUT_S = 0.3


@pytest.fixture
def short_timeouts(monkeypatch):
    monkeypatch.setattr(remote, "CONNECT_TIMEOUT_S", TIMEOUT_S)
    monkeypatch.setattr(remote, "READ_TIMEOUT_S", TIMEOUT_S)
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)


@pytest.fixture
def silent_server():
    """A server on loopback that accepts every connection and never sends a byte: its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()
    for connection in held:
        connection.close()


class StallingHandler(http.server.BaseHTTPRequestHandler):
    """Answers HEAD (a file of 100 bytes) and stalls on GET until the test ends: a listing that works and a
    download that hangs."""
    release: threading.Event

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()

    def do_GET(self) -> None:
        self.release.wait(10)


@pytest.fixture
def stalling_server():
    release = threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (StallingHandler,),
                                                                    {"release": release}))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    release.set()
    httpd.shutdown()
    httpd.server_close()


def paths(tmp_path):
    return {"out_dir": tmp_path / "data" / "raw", "manifest": tmp_path / "data" / "manifest.json",
            "downloads": tmp_path / "data" / "downloads"}


@pytest.mark.parametrize("name", ["web.jsonl", "corpus/", "corpus/*.jsonl"], ids=["file", "folder", "glob"])
def test_an_http_source_that_never_answers_is_a_timeout_not_a_hang(tmp_path, silent_server, short_timeouts, name):
    url = f"{silent_server}/{name}"
    started = time.monotonic()
    with pytest.raises(InputError) as raised:
        fetch(url, **paths(tmp_path))
    assert time.monotonic() - started < 10 * TIMEOUT_S
    message = str(raised.value)
    assert "\n" not in message and url in message and f"timed out after {TIMEOUT_S:g} s" in message
    assert "not found" not in message
    assert not (tmp_path / "data" / "raw").exists()


def test_a_download_that_stalls_is_a_timeout_after_the_retries(tmp_path, stalling_server, short_timeouts,
                                                               monkeypatch):
    monkeypatch.setattr(remote, "STALLED_ATTEMPTS", 2)
    url = f"{stalling_server}/web.jsonl"
    with pytest.raises(InputError) as raised:
        fetch(url, **paths(tmp_path))
    message = str(raised.value)
    assert message.startswith(f"data.source: cannot download {url}: the transfer timed out after {TIMEOUT_S:g} s")
    assert "2 attempts in a row" in message and "\n" not in message


def test_an_hf_source_that_never_answers_is_the_same_timeout(tmp_path, silent_server, short_timeouts, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", silent_server)
    url = "hf://datasets/me/web@main/data/*.parquet"
    started = time.monotonic()
    with pytest.raises(InputError) as raised:
        fetch(url, **paths(tmp_path))
    assert time.monotonic() - started < 10 * TIMEOUT_S
    assert str(raised.value) == f"data.source: listing {url} timed out after {TIMEOUT_S:g} s waiting for an answer"


def test_the_stage_reports_a_timeout_in_one_line_exit_2(tmp_path, silent_server, short_timeouts):
    params = write_params(tmp_path / "params.yaml", data={"source": f"{silent_server}/web.jsonl"})
    result = run_stage(tmp_path, "fetch", "--params", params)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "timed out after" in result.stderr, result.stderr


# --- links out of the corpus folder (issue 31, item 10) -------------------------------------------------------

def test_links_that_leave_the_source_folder_are_left_out_and_counted(tmp_path, caplog):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "shadow.txt").write_text("root:$6$hash")
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("kept")
    (src / "sub" / "b.txt").write_text("kept, and linked to from inside")
    (src / "out.txt").symlink_to(secret / "shadow.txt")  # a link out
    (src / "sub" / "hop.txt").symlink_to(src / "out.txt")  # a link in, to a link out
    (src / "in.txt").symlink_to(src / "sub" / "b.txt")  # a link in: followed
    (src / "secrets").symlink_to(secret, target_is_directory=True)  # a folder link out
    (src / "dangling.txt").symlink_to(tmp_path / "nothing.txt")
    (src / "loop.txt").symlink_to(src / "loop2.txt")
    (src / "loop2.txt").symlink_to(src / "loop.txt")
    out = tmp_path / "raw"
    summary = fetch(str(src), out)
    brought = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert brought == ["a.txt", "in.txt", "sub/b.txt"]
    assert (out / "in.txt").read_text() == "kept, and linked to from inside"
    assert summary.skipped == {
        "link_outside_source": [str(src / "out.txt"), str(src / "secrets"), str(src / "sub" / "hop.txt")],
        "broken_symlink": [str(src / "dangling.txt"), str(src / "loop.txt"), str(src / "loop2.txt")],
    }
    assert "left out 3 (link_outside_source)" in caplog.text
    assert not any("root:" in p.read_text() for p in out.rglob("*") if p.is_file())


def test_a_glob_leaves_out_links_out_of_its_folder_and_a_named_file_is_followed(tmp_path):
    (tmp_path / "shadow.txt").write_text("secret")
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("kept")
    (src / "out.txt").symlink_to(tmp_path / "shadow.txt")
    summary = fetch(str(src / "*.txt"), tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["a.txt"]
    assert summary.skipped == {"link_outside_source": [str(src / "out.txt")]}
    # data.source naming the file itself is the user's choice: followed.
    fetch(str(src / "out.txt"), tmp_path / "raw")
    assert (tmp_path / "raw" / "out.txt").read_text() == "secret"


def test_a_folder_with_only_links_out_names_why_nothing_was_found(tmp_path):
    (tmp_path / "shadow.txt").write_text("secret")
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "out.txt").symlink_to(tmp_path / "shadow.txt")
    with pytest.raises(InputError, match=r"no .* files found at '.*corpus' \(left out: 1 link_outside_source\)"):
        fetch(str(src), tmp_path / "raw")


# --- file names that are not UTF-8 (issue 31, item 12) --------------------------------------------------------

def test_file_names_that_are_not_utf8_are_left_out_and_named_printably(tmp_path, caplog):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("kept")
    bad = [b"\xff.txt", b"caf\xe9.md", b"sub/\xc3(.jsonl"]
    for name in bad:
        (src / os.fsdecode(name)).write_bytes(b"text")
    os.mkdir(os.path.join(os.fsencode(src), b"\xfe"))
    (src / os.fsdecode(b"\xfe") / "inner.txt").write_text("text")
    where = paths(tmp_path)
    summary = fetch(str(src), **where)
    assert sorted(p.relative_to(where["out_dir"]).as_posix() for p in where["out_dir"].rglob("*") if p.is_file()) \
        == ["a.txt"]
    shown = [f"{src}/\\xfe/inner.txt", f"{src}/caf\\xe9.md", f"{src}/sub/\\xc3(.jsonl", f"{src}/\\xff.txt"]
    assert sorted(summary.skipped["undecodable_name"]) == sorted(shown)
    assert set(summary.skipped) == {"undecodable_name"}
    assert f"{src}/\\xff.txt" in caplog.text
    assert [file.name for file in read_manifest(where["manifest"]).files] == ["a.txt"]
    where["manifest"].read_bytes().decode("utf-8")  # and it is plain UTF-8 JSON


def test_the_stage_reports_a_folder_of_undecodable_names_in_one_line(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / os.fsdecode(b"\xff.txt")).write_text("text")
    params = write_params(tmp_path / "params.yaml", data={"source": str(src)})
    result = run_stage(tmp_path, "fetch", "--params", params)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert str(src) in result.stderr and "1 undecodable_name" in result.stderr


# --- damaged manifests (issue 31, item 12) --------------------------------------------------------------------

GOOD_ENTRY = {"name": "a.parquet", "size": 4, "sha256": "ab" * 32, "url": "hf://datasets/me/web@c0ffee/a.parquet",
              "etag": "ab" * 32, "revision": "c0ffee"}
ODD_VALUES = [None, True, 0, -1, 1.5, float("nan"), "", "x", "AB" * 32, "g" * 64, [], {}, ["a"], {"a": 1}, 10 ** 30]


def damaged_documents() -> list[str]:
    """Manifests damaged in every way we could think of, as text: each field missing, or of every odd value; the
    document or its files of the wrong shape; truncated at every length; bytes flipped; pathological JSON."""
    good = {"version": 1, "source": "hf://datasets/me/web@main/*.parquet", "files": [GOOD_ENTRY]}
    cases = []
    for key in good:
        cases.append({k: v for k, v in good.items() if k != key})
        cases += [{**good, key: value} for value in ODD_VALUES]
    for key in GOOD_ENTRY:
        cases.append({**good, "files": [{k: v for k, v in GOOD_ENTRY.items() if k != key}]})
        cases += [{**good, "files": [{**GOOD_ENTRY, key: value}]} for value in ODD_VALUES]
    cases += [{**good, "extra": 1}, {**good, "files": [{**GOOD_ENTRY, "extra": 1}]}, good["files"], "text", 1, None]
    texts = [json.dumps(case) for case in cases]
    whole = json.dumps(good)
    texts += [whole[:length] for length in range(len(whole))]
    rng = random.Random(31)
    for _ in range(100):
        chars = list(whole)
        chars[rng.randrange(len(chars))] = chr(rng.randrange(32, 127))
        texts.append("".join(chars))
    texts += ["[" * 10_000 + "]" * 10_000, '{"version": ' + "1" * 5000 + "}", "NaN", "\ufeff" + whole,
              whole.replace('"size": 4', '"size": 4.0'), whole.replace('"size": 4', '"size": Infinity')]
    return texts


def test_every_damaged_manifest_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    outcomes = {"read": 0, "refused": 0}
    for text in damaged_documents():
        path.write_text(text)
        try:
            manifest = read_manifest(path)
        except InputError as err:
            message = str(err)
            assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 500, (text, message)
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1  # what is accepted is well-formed: what fetch relies on holds
        for file in manifest.files:
            assert isinstance(file.size, int) and not isinstance(file.size, bool) and file.size >= 0, text
            assert len(file.sha256) == 64 and set(file.sha256) <= set("0123456789abcdef"), text
            assert file.name and all(isinstance(v, str) for v in (file.url, file.etag, file.revision)
                                     if v is not None), text
    assert outcomes["refused"] > 300 and outcomes["read"] > 0, outcomes
    for text in [b"\xff\xfe{", b""]:
        path.write_bytes(text)
        with pytest.raises(InputError, match="manifest.json: cannot read"):
            read_manifest(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(InputError, match="manifest.json: cannot read"):
        read_manifest(path)


def test_the_stage_refuses_a_damaged_manifest_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("[" * 10_000)
    params = write_params(tmp_path / "params.yaml", data={"source": "memory://nowhere/a.txt"})
    result = run_stage(tmp_path, "fetch", "--params", params)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "data/manifest.json: cannot read the fetch manifest" in result.stderr


def test_a_manifest_round_trips(tmp_path):
    manifest = Manifest("s", (ManifestFile(**GOOD_ENTRY), ManifestFile("b.txt", 0, "cd" * 32)))
    write_manifest(tmp_path / "m.json", manifest)
    assert read_manifest(tmp_path / "m.json") == manifest


# --- every fetch error names its URL or file (issue 31, item 12) ----------------------------------------------

OUTPUTS_IN_THE_WAY = {  # what is in the way, the options, the file the error must name
    "the manifest is a folder": (lambda work: (work / "data" / "manifest.json").mkdir(parents=True), (),
                                 "data/manifest.json: is a folder"),
    "data is a file": (lambda work: (work / "data").write_text("mine"), (), "data: is a file"),
    "data/raw is a file": (lambda work: ((work / "data").mkdir(), (work / "data" / "raw").write_text("mine")), (),
                           "data/raw: is a file"),
    "the downloads folder is a file": (lambda work: ((work / "data").mkdir(),
                                                     (work / "data" / "downloads").write_text("mine")), (),
                                       "data/downloads: is a file"),  # the source is a URL then (below)
    "the manifest's folder is a file": (lambda work: (work / "lock").write_text("mine"),
                                        ("--manifest", "lock/manifest.json"), "lock: is a file"),
}


@pytest.mark.parametrize("case", OUTPUTS_IN_THE_WAY)
def test_an_output_path_in_the_way_is_one_line_naming_it_and_nothing_is_written(tmp_path, case):
    setup, options, named = OUTPUTS_IN_THE_WAY[case]
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("alpha")
    work = tmp_path / "work"
    work.mkdir()
    fsspec.filesystem("memory").pipe(f"/{tmp_path.name}/a.txt", b"alpha")
    source = f"memory://{tmp_path.name}/a.txt" if "downloads" in case else str(src)
    params = write_params(work / "params.yaml", data={"source": source})
    setup(work)
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    result = run_stage(work, "fetch", "--params", params, *options)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"error: {named}" in result.stderr
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before, "nothing written"


def test_an_unwritable_output_is_one_line_naming_it(tmp_path, monkeypatch):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("alpha")
    # Tests run as root, whom permissions do not stop: the kernel's answer for a folder we may not write.
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(PermissionError(13, "Permission denied",
                                                                                       args[1])))
    monkeypatch.setattr("shutil.copyfile", lambda src_, dst: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(dst))))
    with pytest.raises(InputError) as raised:
        fetch(str(src), tmp_path / "raw")
    message = str(raised.value)
    assert "a.txt: Permission denied (bringing data.source into it" in message and "\n" not in message


SOURCE_ERRORS = {  # a source that fails, and what its one line must say besides naming it
    "http://127.0.0.1:1/a.txt": "cannot list 'http://127.0.0.1:1/a.txt': Cannot connect",  # refused: not "not found"
    "http://127.0.0.1:99999/a.txt": "cannot list 'http://127.0.0.1:99999/a.txt': Port out of range",
    "foo://x/a.txt": "no filesystem for foo:// URLs",
    "memory://nowhere/a.txt": "'memory://nowhere/a.txt' not found",
    "http://example.com/a.txt": "'http://example.com/a.txt' uses plain http://",
    "/nowhere/at/all": "'/nowhere/at/all' is not a builtin corpus",
    "/nowhere/*.txt": "files found at '/nowhere/*.txt'",
}


@pytest.mark.parametrize("source", SOURCE_ERRORS)
def test_every_source_error_names_the_source(tmp_path, source):
    with pytest.raises(InputError) as raised:
        fetch(source, **paths(tmp_path))
    message = str(raised.value)
    assert "\n" not in message and message.startswith("data.source: ") and SOURCE_ERRORS[source] in message, message
