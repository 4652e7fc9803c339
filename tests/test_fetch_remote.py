"""data.source as a URL: listing, the download cache, resume, verification and the manifest. Hermetic: an HTTP
server on 127.0.0.1 and fsspec's in-memory filesystem stand in for the stores."""

import hashlib
import http.server
import importlib.util
import json
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest

from llm import remote
from llm.errors import InputError
from llm.fetch import fetch
from llm.manifest import Manifest, ManifestFile, read_manifest, write_manifest
from llm.remote import Pin
from tests.conftest import read_json, run_stage, write_params


class Server:
    """Files under `root` over HTTP: ETag (the content's md5), Content-Length, Range (206 + Content-Range).
    `requests` records (method, path, first byte asked for); with `drop` set, the first GET of each file sends
    half the body and closes the connection; with `ranges` unset, Range is ignored (200 and the whole file)."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests, self.drop, self.dropped, self.ranges = root, [], False, set(), True
        handler = type("Handler", (Handler,), {"state": self})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def gets(self) -> list[tuple[str, int]]:
        return [(path, start) for method, path, start in self.requests if method == "GET"]


class Handler(http.server.BaseHTTPRequestHandler):
    state: Server

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.respond(body=False)

    def do_GET(self) -> None:
        self.respond(body=True)

    def respond(self, body: bool) -> None:
        asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start = int(asked[1]) if asked else 0
        self.state.requests.append((self.command, self.path, start))
        if not self.state.ranges:
            asked, start = None, 0
        path = self.state.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        end = int(asked[2]) + 1 if asked and asked[2] else len(data)
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        if self.state.drop and self.path not in self.state.dropped:
            self.state.dropped.add(self.path)
            self.wfile.write(data[start:start + (end - start) // 2])
            self.wfile.flush()
            time.sleep(0.3)  # the client has read what was sent before the connection goes
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data[start:end])


@pytest.fixture
def server(tmp_path):
    (tmp_path / "site").mkdir()
    served = Server(tmp_path / "site")
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


@pytest.fixture
def memory_store(tmp_path):
    """A folder of fsspec's in-memory filesystem, unique to the test: (its memory:// URL, the filesystem)."""
    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}"
    yield f"memory://{root}", fs
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)


def corpus_bytes(seed: int, size: int) -> bytes:
    lines = (f'{{"text": "document {seed}-{i}: {"lorem ipsum " * (i % 7)}"}}\n' for i in range(size))
    return "".join(lines).encode()[:size]


def paths(tmp_path: Path) -> dict:
    return {"out_dir": tmp_path / "data" / "raw", "manifest": tmp_path / "data" / "manifest.json",
            "downloads": tmp_path / "data" / "downloads"}


def test_a_url_is_downloaded_with_a_manifest_and_a_rerun_downloads_nothing(tmp_path, server):
    data = corpus_bytes(1, 200_000)
    (server.root / "web.jsonl").write_bytes(data)
    where = paths(tmp_path)
    summary = fetch(server.url("web.jsonl"), **where)
    assert (where["out_dir"] / "web.jsonl").read_bytes() == data
    assert (summary.downloaded, summary.reused) == (1, 0)
    manifest = read_json(where["manifest"])
    assert manifest == {"version": 1, "source": server.url("web.jsonl"), "files": [{
        "name": "web.jsonl", "url": server.url("web.jsonl"), "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "etag": f'"{hashlib.md5(data).hexdigest()}"'}]}
    assert server.gets() == [("/web.jsonl", 0)]

    before = where["manifest"].read_bytes()
    summary = fetch(server.url("web.jsonl"), **where)
    assert (summary.downloaded, summary.reused) == (0, 1)
    assert server.gets() == [("/web.jsonl", 0)], "the rerun made no GET: only the listing's HEAD"
    assert where["manifest"].read_bytes() == before, "same bytes, same manifest"
    assert (where["out_dir"] / "web.jsonl").stat().st_ino == next(where["downloads"].iterdir()).stat().st_ino, \
        "data/raw holds a hard link into the download cache, not a second copy"


def test_a_dropped_connection_resumes_where_it_broke(tmp_path, server, caplog):
    data = corpus_bytes(2, 300_000)
    (server.root / "big.jsonl").write_bytes(data)
    server.drop = True
    where = paths(tmp_path)
    fetch(server.url("big.jsonl"), **where)
    assert (where["out_dir"] / "big.jsonl").read_bytes() == data
    assert server.gets() == [("/big.jsonl", 0), ("/big.jsonl", len(data) // 2)], \
        "the retry asked for the rest only, from the byte where the connection dropped"
    assert f"resuming from byte {len(data) // 2}" in caplog.text
    assert [p.name.endswith(".part") for p in where["downloads"].iterdir()] == [False]


def test_a_server_that_ignores_range_is_read_again_from_the_start(tmp_path, server):
    data = corpus_bytes(6, 100_000)
    (server.root / "big.jsonl").write_bytes(data)
    server.drop, server.ranges = True, False
    where = paths(tmp_path)
    fetch(server.url("big.jsonl"), **where)
    assert (where["out_dir"] / "big.jsonl").read_bytes() == data
    assert server.gets() == [("/big.jsonl", 0), ("/big.jsonl", len(data) // 2)], "asked for the rest, got it all"


def test_bytes_that_differ_from_the_pin_are_refused_and_nothing_reaches_raw(tmp_path, server):
    (server.root / "web.jsonl").write_bytes(b'{"text": "forged"}\n')
    pinned = server.url("web.jsonl") + "#sha256=" + hashlib.sha256(b'{"text": "genuine"}\n').hexdigest()
    where = paths(tmp_path)
    where["out_dir"].mkdir(parents=True)
    (where["out_dir"] / "earlier.txt").write_text("the last good fetch")
    with pytest.raises(InputError, match=r"refused .*web\.jsonl: sha256 .* does not match .*#sha256= pin"):
        fetch(pinned, **where)
    assert [p.name for p in where["out_dir"].iterdir()] == ["earlier.txt"]
    assert list(where["downloads"].iterdir()) == [], "the refused bytes are not kept, not even as a .part"
    assert not where["manifest"].exists()

    (server.root / "web.jsonl").write_bytes(b'{"text": "genuine"}\n')
    fetch(pinned, **where)
    assert (where["out_dir"] / "web.jsonl").read_bytes() == b'{"text": "genuine"}\n'


def test_the_manifest_locks_the_bytes_of_the_first_fetch(tmp_path, server):
    (server.root / "web.jsonl").write_bytes(corpus_bytes(3, 50_000))
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(work / "params.yaml", data={"source": server.url("web.jsonl")})
    assert run_stage(work, "fetch", "--params", params).returncode == 0

    (server.root / "web.jsonl").write_bytes(corpus_bytes(4, 50_000))  # changed upstream, same size
    for cached in (work / "data" / "downloads").iterdir():
        cached.unlink()
    result = run_stage(work, "fetch", "--params", params)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: data.source: refused " + server.url("web.jsonl"))
    assert "does not match" in error and "manifest" in error
    assert (work / "data" / "raw" / "web.jsonl").read_bytes() == corpus_bytes(3, 50_000), "raw untouched"


def test_the_stage_fetches_a_url_and_writes_the_manifest_where_told(tmp_path, server):
    data = corpus_bytes(5, 20_000)
    (server.root / "docs").mkdir()
    (server.root / "docs" / "notes.md").write_bytes(data)
    source = server.url("docs/notes.md") + "#sha256=" + hashlib.sha256(data).hexdigest()
    work = tmp_path / "work"
    work.mkdir()
    params = write_params(work / "params.yaml", data={"source": source})
    result = run_stage(work, "fetch", "--params", params, "--out", "raw", "--manifest", "lock.json")
    assert result.returncode == 0, result.stderr
    assert "1 downloaded, 0 reused" in result.stderr
    assert (work / "raw" / "notes.md").read_bytes() == data
    manifest = read_manifest(work / "lock.json")
    assert manifest.source == source
    assert [(f.name, f.size, f.sha256) for f in manifest.files] == [
        ("notes.md", len(data), hashlib.sha256(data).hexdigest())]
    assert len(list((work / "data" / "downloads").iterdir())) == 1, "the default download cache"

    result = run_stage(work, "fetch", "--params", params, "--out", "raw", "--manifest", "lock.json")
    assert result.returncode == 0 and "0 downloaded, 1 reused" in result.stderr, result.stderr


def test_a_memory_glob_brings_the_supported_suffixes_and_lists_the_rest(tmp_path, memory_store):
    url, fs = memory_store
    root = url.removeprefix("memory://")
    files = {"a.jsonl": b'{"text": "a"}\n', "b.jsonl.gz": b"\x1f\x8b gz", "c.jsonl.zst": b"(\xb5/\xfd zst",
             "d.parquet": b"PAR1", "e.txt": b"e", "f.md": b"# f", "g.png": b"\x89PNG", "h.json": b"{}",
             "sub/i.txt": b"deeper"}
    for name, data in files.items():
        fs.pipe(f"{root}/{name}", data)
    where = paths(tmp_path)
    summary = fetch(f"{url}/*", **where)
    brought = {p.name: p.read_bytes() for p in where["out_dir"].iterdir()}
    assert brought == {name: files[name] for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.txt",
                                                      "f.md")}
    assert summary.skipped == {"unsupported_suffix": [f"memory://{root}/g.png", f"memory://{root}/h.json"]}

    summary = fetch(url, **where)  # a folder: everything under it, named by its path below the folder
    assert (where["out_dir"] / "sub" / "i.txt").read_bytes() == b"deeper"
    assert [entry.name for entry in read_manifest(where["manifest"]).files][-1] == "sub/i.txt"


def test_a_missing_protocol_package_names_the_key_and_the_package(tmp_path):
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here, so s3:// has its package")
    with pytest.raises(InputError) as raised:
        fetch("s3://bucket/corpus.jsonl", **paths(tmp_path))
    message = str(raised.value)
    assert "\n" not in message and "data.source" in message and "pip install s3fs" in message
    assert not (tmp_path / "data" / "raw").exists()


def test_plain_http_is_for_loopback_or_a_pinned_file(tmp_path):
    with pytest.raises(InputError, match="plain http://; use https://"):
        fetch("http://example.com/corpus.jsonl", **paths(tmp_path))


def test_a_missing_url_is_an_input_error(tmp_path, server):
    with pytest.raises(InputError, match="data.source: .*gone.jsonl.* not found"):
        fetch(server.url("gone.jsonl"), **paths(tmp_path))


def test_a_store_that_keeps_failing_is_given_up_after_attempts_without_progress(tmp_path, memory_store,
                                                                                  monkeypatch):
    url, fs = memory_store
    fs.pipe(f"{url.removeprefix('memory://')}/a.txt", b"x" * 100)
    monkeypatch.setattr(remote, "copy_from", lambda *args: (_ for _ in ()).throw(ConnectionResetError("reset")))
    with pytest.raises(InputError, match=r"cannot download .*a\.txt: reset \(5 attempts"):
        fetch(f"{url}/a.txt", **paths(tmp_path))


def test_store_checksums_become_pins():
    lfs = {"lfs": {"sha256": "ab" * 32, "size": 9, "pointer_size": 130}, "blob_id": "c" * 40}
    assert remote.store_checksum("hf", lfs) == ("ab" * 32, [Pin("sha256", "ab" * 32, "the store's LFS sha256")])
    etag, pins = remote.store_checksum("hf", {"lfs": None, "blob_id": "c" * 40})
    assert etag == "c" * 40 and [pin.algorithm for pin in pins] == ["git-sha1"]
    etag, pins = remote.store_checksum("s3", {"ETag": '"' + "0123456789abcdef" * 2 + '"'})
    assert [(pin.algorithm, pin.hexdigest) for pin in pins] == [("md5", "0123456789abcdef" * 2)]
    assert remote.store_checksum("s3", {"ETag": '"' + "0" * 32 + '-3"'})[1] == [], "multipart: no MD5"
    assert remote.store_checksum("https", {"ETag": '"' + "0" * 32 + '"'})[1] == [], "an HTTP ETag is opaque"
    assert remote.store_checksum("gs", {"md5Hash": "XUFAKrxLKna5cZ2REBfFkg=="})[1][0].hexdigest == \
        hashlib.md5(b"hello").hexdigest()


def test_a_git_blob_id_is_checked(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello\n")
    assert remote.digests(path, {"git-sha1"})["git-sha1"] == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_an_hf_branch_is_pinned_to_its_commit(monkeypatch):
    from huggingface_hub import HfApi, HfFileSystem

    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(HfFileSystem, "_repo_and_revision_exist", lambda self, *args: (True, None))
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, revision=None, repo_type=None, **kwargs:
                        SimpleNamespace(sha=sha) if (repo_id, revision, repo_type) == ("me/web", "main", "dataset")
                        else pytest.fail(f"asked for {repo_id}@{revision} ({repo_type})"))
    path, revision = remote.pin_revision(HfFileSystem(), "datasets/me/web@main/data/*.parquet")
    assert (path, revision) == (f"datasets/me/web@{sha}/data/*.parquet", sha)
    assert remote.glob_root(HfFileSystem(), path) == f"datasets/me/web@{sha}/data"


def test_the_manifest_reader_is_strict(tmp_path):
    path = tmp_path / "manifest.json"
    assert read_manifest(path) is None
    manifest = Manifest("hf://datasets/me/web@main/*.parquet", (
        ManifestFile("a.parquet", 4, "ab" * 32, "hf://datasets/me/web@c0ffee/a.parquet", "ab" * 32, "c0ffee"),))
    write_manifest(path, manifest)
    assert read_manifest(path) == manifest
    document = json.loads(path.read_text())
    document["files"][0]["sha256"] = 7
    path.write_text(json.dumps(document))
    with pytest.raises(InputError, match=r"manifest.json: not a fetch manifest \(files\[0\]\.sha256 is 7"):
        read_manifest(path)
    document["files"][0]["sha256"], document["version"] = "ab" * 32, 2
    path.write_text(json.dumps(document))
    with pytest.raises(InputError, match="manifest.json: not a fetch manifest .*version is 2"):
        read_manifest(path)
    path.write_text("{")
    with pytest.raises(InputError, match="manifest.json: cannot read"):
        read_manifest(path)


def test_local_and_builtin_sources_get_a_manifest_too(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("alpha")
    (src / "b.jsonl.gz").write_bytes(b"\x1f\x8b")
    where = paths(tmp_path)
    fetch(str(src), **where)
    assert read_json(where["manifest"]) == {"version": 1, "source": str(src), "files": [
        {"name": "a.txt", "size": 5, "sha256": hashlib.sha256(b"alpha").hexdigest()},
        {"name": "b.jsonl.gz", "size": 2, "sha256": hashlib.sha256(b"\x1f\x8b").hexdigest()}]}
    assert not where["downloads"].exists(), "no download cache for a local source"
