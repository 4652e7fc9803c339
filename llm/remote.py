"""URL sources for data.source (https://, hf://, s3://, gs://, and any other fsspec URL): listing, and download with
resume and verification against the store's checksums, a #sha256= pin and the fetch manifest (llm/manifest.py).

We download to local files and never stream from the source straight into clean: a local copy is what lets DVC
hash the stage's output by content, lets clean and the tokenizer rerun without touching the network, and lets an
interrupted download resume. Downloads land in a cache folder (data/downloads/, not a DVC out, so DVC does not
delete it before rerunning fetch) and data/raw/ gets hard links to them.
"""

import base64
import dataclasses
import hashlib
import logging
import os
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import fsspec
from fsspec import AbstractFileSystem

from llm.errors import InputError, first_line
from llm.fileio import DiskFull, out_of_space
from llm.manifest import ManifestFile

log = logging.getLogger(__name__)

URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
PINNED = re.compile(r"(?P<url>.+)#sha256=(?P<sha256>[0-9a-fA-F]{64})")  # pip's way to pin one file's bytes
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CHUNK_BYTES = 8 << 20  # one read, and for seekable stores one ranged request: what a dropped connection costs
STALLED_ATTEMPTS = 5  # attempts in a row that add no byte before a download is given up
BACKOFF_S = 1.0  # wait before the first retry, doubled for each attempt in a row that added nothing
# The one timeout policy for every URL scheme (README, "Or point it at a URL"): a store that does not answer is an
# error naming the URL, never a hang. Connecting, and each wait for bytes of a listing or a download, get this long
# (fsspec's HTTP lists a file with a HEAD, then a GET: twice the read timeout at most); a whole download has no
# limit, since a large file on a slow link is no fault. A download that times out is retried as a dropped
# connection is (STALLED_ATTEMPTS).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0


def is_url(source: str) -> bool:
    return URL.match(source) is not None


# --- listing ------------------------------------------------------------------------------------------------

class Pin(NamedTuple):
    algorithm: str  # sha256, md5 or git-sha1 (git's blob id: sha1 of "blob SIZE\0" + bytes)
    hexdigest: str
    origin: str  # who says so, for the refusal message


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    url: str  # this one file (hf://: at the pinned commit)
    name: str  # path under data/raw/: relative to the listing root
    size: int | None  # bytes as listed; None when the store does not say (HTTP without Content-Length)
    etag: str | None  # the store's checksum or version tag, as it gives it
    revision: str | None  # hf://: the commit sha
    pins: tuple[Pin, ...]  # digests the bytes must have
    fs: AbstractFileSystem = dataclasses.field(repr=False, compare=False)
    path: str = dataclasses.field(repr=False)  # the file as `fs` names it


def protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def is_http(fs: AbstractFileSystem) -> bool:
    return "http" in protocols(fs)


def check_transport(url: str, pinned: bool) -> None:
    """Plain HTTP lets anyone on the path change the bytes: it is allowed to loopback (test servers, a local
    mirror) or for a single file pinned with #sha256=, as pip allows."""
    if url.lower().startswith("http://") and urlsplit(url).hostname not in LOOPBACK and not pinned:
        raise InputError(f"data.source: '{url}' uses plain http://; use https://, or pin the file with "
                         "#sha256=<hex>")


def timeout_options(scheme: str) -> dict[str, Any]:
    """The storage options that give `scheme`'s filesystem our timeouts, each in its own client's terms."""
    if scheme in ("http", "https"):
        import aiohttp  # fsspec's HTTP client; its default is a 5-minute limit on the whole request

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)}}
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S}}
    if scheme in ("gs", "gcs"):
        import aiohttp

        return {"session_kwargs": {"timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)}}
    if scheme == "hf":
        import huggingface_hub

        huggingface_hub.set_client_factory(hf_client)
    return {}


def hf_client() -> Any:
    """huggingface_hub's shared HTTP client, with our timeouts. HfFileSystem takes no timeout option and the hub
    library sends most requests with none (a few with 10 s), so a hook sets ours on every request, reading the
    constants as it sends."""
    from huggingface_hub.utils._http import default_client_factory

    def bounded(request: Any) -> None:
        read = READ_TIMEOUT_S
        request.extensions = {**request.extensions,
                              "timeout": {"connect": CONNECT_TIMEOUT_S, "read": read, "write": read, "pool": read}}

    client = default_client_factory()
    client.event_hooks["request"].append(bounded)
    return client


def timed_out(err: BaseException) -> str | None:
    """"connect" or "read" when `err` or an error it was raised from is a timeout, else None. Stores wrap their
    client's errors (fsspec's HTTP turns every failure into FileNotFoundError), so the chain is searched, and by
    class name, since each client (aiohttp, httpx, botocore) has its own timeout classes."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        if "Timeout" in name or isinstance(err, TimeoutError):
            return "connect" if "Connect" in name else "read"
        err = err.__cause__ or err.__context__
    return None


def timeout_message(url: str, kind: str) -> str:
    limit = CONNECT_TIMEOUT_S if kind == "connect" else READ_TIMEOUT_S
    what = "connecting" if kind == "connect" else "waiting for an answer"
    return f"{url} timed out after {limit:g} s {what}"


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for `url`, with our timeouts, and the path within it; a protocol whose package is
    missing is an InputError that says what to install."""
    scheme = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url, **timeout_options(scheme))
    except ImportError as err:
        package = (getattr(err.__cause__, "name", None) or scheme).split(".")[0]
        raise InputError(f"data.source: {scheme}:// URLs need the package {package}, which is not installed: "
                         f"pip install {package}") from None
    except ValueError as err:
        raise InputError(f"data.source: no filesystem for {scheme}:// URLs ({first_line(err)})") from None


def pin_revision(fs: AbstractFileSystem, path: str) -> tuple[str, str | None]:
    """hf:// only: `path` at the commit its revision (a branch, a tag, a sha, or the default branch) resolves to
    now, and that sha; so a branch is read at one commit throughout and the manifest records which. Other
    stores: (path, None)."""
    if "hf" not in protocols(fs):
        return path, None
    from huggingface_hub import HfApi
    from huggingface_hub.hf_file_system import HfFileSystemResolvedRepositoryPath

    resolved = fs.resolve_path(path)
    if not isinstance(resolved, HfFileSystemResolvedRepositoryPath):
        return path, None  # a bucket: no revisions
    api = HfApi(endpoint=fs.endpoint, token=fs.token)
    sha = api.repo_info(resolved.repo_id, revision=resolved.revision, repo_type=resolved.repo_type).sha
    pinned = HfFileSystemResolvedRepositoryPath(resolved.repo_type, resolved.repo_id, sha, resolved.path_in_repo)
    return pinned.unresolve(), sha


def glob_root(fs: AbstractFileSystem, path: str) -> str | None:
    """The folder above the first glob character of `path`, or None when `path` is no glob. In a URL `?`
    starts the query, so HTTP globs use `*` and `[` only (as fsspec's HTTP glob does)."""
    magic = "*[" if is_http(fs) else "*?["
    first = min((path.find(char) for char in magic if char in path), default=-1)
    return None if first < 0 else path[:first].rsplit("/", 1)[0]


def find(fs: AbstractFileSystem, path: str) -> tuple[str, list[dict[str, Any]]]:
    """(listing root, the files' info dicts): every file a glob matches, every file under a folder (a path
    ending in "/" is taken for one), or the one file."""
    root = glob_root(fs, path)
    if root is not None:
        found = fs.glob(path, detail=True).values()
    elif path.endswith("/") or fs.info(path)["type"] == "directory":
        # on_error: fsspec's walk leaves out a folder it fails to list, a timeout included, by default
        root, found = path.rstrip("/"), fs.find(path, detail=True, on_error="raise").values()
    else:
        without_query = path.split("?", 1)[0] if is_http(fs) else path  # a query may hold a "/"
        root, found = without_query.rsplit("/", 1)[0], [fs.info(path)]
    return root, sorted((info for info in found if info["type"] == "file"), key=lambda info: info["name"])


def relative_name(fs: AbstractFileSystem, root: str, path: str) -> str:
    """The name under data/raw/ of the file at `path`: its path below `root` (an HTTP query left out)."""
    if is_http(fs):
        root, path = urlsplit(root).path, urlsplit(path).path
    name = path[len(root):].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]
    if not name or PurePosixPath(name).is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise InputError(f"data.source: the store lists a file as '{path}', which has no safe name under the "
                         "output folder")
    return name


def store_checksum(protocol: str, info: dict[str, Any]) -> tuple[str | None, list[Pin]]:
    """The store's own checksum or version tag for a listed file, and the digests of it we can check."""
    lfs = info.get("lfs")
    if lfs:  # Hugging Face, a file in LFS (or Xet): its sha256
        return lfs["sha256"], [Pin("sha256", lfs["sha256"], "the store's LFS sha256")]
    if info.get("blob_id"):  # Hugging Face, a file in git itself
        return info["blob_id"], [Pin("git-sha1", info["blob_id"], "the store's git blob id")]
    etag = info.get("ETag") or info.get("etag")
    pins = []
    plain = (etag or "").strip('"').lower()
    # An S3 ETag of 32 hex digits is the MD5 of the bytes; a multipart upload's ends in "-PARTS" and is not.
    if protocol in ("s3", "s3a") and re.fullmatch(r"[0-9a-f]{32}", plain):
        pins.append(Pin("md5", plain, "the store's ETag (MD5; an SSE-KMS object's is not)"))
    if info.get("md5Hash"):  # Google Cloud Storage, base64 (a composite object has none)
        pins.append(Pin("md5", base64.b64decode(info["md5Hash"]).hex(), "the store's md5Hash"))
    return etag, pins


def listing_error(source: str, err: Exception) -> str:
    """What went wrong listing `source`, in one line."""
    if kind := timed_out(err):
        return f"listing {timeout_message(source, kind)}"
    cause = err
    while isinstance(cause, FileNotFoundError) and cause.__cause__ is not None:
        cause = cause.__cause__  # fsspec's HTTP raises FileNotFoundError for any failure, from the real one
    if isinstance(cause, FileNotFoundError) or getattr(cause, "status", None) in (404, 410):  # 404: aiohttp's
        return f"'{source}' not found"
    return f"cannot list '{source}': {first_line(cause)}"


def list_remote(source: str) -> list[RemoteFile]:
    """Every file `source` (a URL of one file, a folder or a glob; a single file may end in #sha256=HEX) names,
    of any suffix, sorted by name."""
    pinned = PINNED.fullmatch(source)
    url = pinned["url"] if pinned else source
    check_transport(url, pinned is not None)
    fs, path = filesystem(url)
    try:
        path, revision = pin_revision(fs, path)
        root, infos = find(fs, path)
    except InputError:
        raise
    except Exception as err:  # the store's own errors: credentials, network, a bad bucket name, a timeout
        raise InputError(f"data.source: {listing_error(source, err)}") from None
    if not infos:
        raise InputError(f"data.source: no files at '{source}'")
    if pinned and len(infos) > 1:
        raise InputError(f"data.source: a #sha256= pin names one file, but '{url}' lists {len(infos)}")
    protocol = url.split("://", 1)[0].lower()
    files = []
    for info in infos:
        etag, pins = store_checksum(protocol, info)
        if pinned:
            pins.append(Pin("sha256", pinned["sha256"].lower(), "the #sha256= pin in data.source"))
        files.append(RemoteFile(url=fs.unstrip_protocol(info["name"]), name=relative_name(fs, root, info["name"]),
                                size=info.get("size"), etag=etag, revision=revision, pins=tuple(pins), fs=fs,
                                path=info["name"]))
    names = [file.name for file in files]
    if len(set(names)) < len(names):
        raise InputError(f"data.source: '{source}' lists two files under one name (an HTTP query string is not "
                         "part of the name); name the files one by one")
    return files


# --- download, resume, verify ---------------------------------------------------------------------------------

def cache_path(downloads: Path, file: RemoteFile) -> Path:
    """Where `file` is kept between runs: named by its URL and its etag (a new version upstream is a new cache
    file, not a stale hit), then its own name for whoever lists the folder."""
    key = hashlib.sha256(f"{file.url}\0{file.etag or ''}".encode()).hexdigest()[:24]
    return downloads / f"{key}-{PurePosixPath(file.name).name}"


def digests(path: Path, algorithms: set[str]) -> dict[str, str]:
    """sha256 of the file at `path`, and the other `algorithms` asked for, in one read."""
    hashes = {"sha256": hashlib.sha256()}
    if "md5" in algorithms:
        hashes["md5"] = hashlib.md5(usedforsecurity=False)
    if "git-sha1" in algorithms:
        hashes["git-sha1"] = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            for digest in hashes.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def mismatch(path: Path, file: RemoteFile, pins: list[Pin]) -> tuple[str | None, str]:
    """(why the bytes at `path` are not the listed file's, or None; their sha256)."""
    size = path.stat().st_size
    if file.size is not None and size != file.size:
        return f"size {size} does not match the listed {file.size} bytes", ""
    found = digests(path, {pin.algorithm for pin in pins})
    for pin in pins:
        if found[pin.algorithm] != pin.hexdigest.lower():
            return f"{pin.algorithm} {found[pin.algorithm]} does not match {pin.hexdigest} ({pin.origin})", \
                found["sha256"]
    return None, found["sha256"]


def open_at(file: RemoteFile, offset: int) -> tuple[Any, int]:
    """A reader of `file` from `offset`, and the offset it really starts at."""
    if is_http(file.fs):
        # fsspec's seekable HTTP file reads a block per request and loses a block cut short; a stream with a
        # Range header keeps every byte that arrived. Identity encoding: a compressed body has other offsets.
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        stream = file.fs.open(file.path, "rb", block_size=0, size=file.size, headers=headers)
        start = offset if stream.r.status == 206 else 0  # a server that ignores Range sends it all again
        return stream, start
    reader = file.fs.open(file.path, "rb", block_size=CHUNK_BYTES, cache_type="none")
    reader.seek(offset)
    return reader, offset


def copy_from(file: RemoteFile, part: Path, offset: int) -> None:
    """Append `file`'s bytes from `offset` to `part`; each block reaches the file as it arrives, so a dropped
    connection leaves every byte received."""
    reader, start = open_at(file, offset)
    with reader, open(part, "r+b" if part.exists() else "wb") as out:
        out.seek(start)
        out.truncate()
        while block := reader.read(CHUNK_BYTES):
            out.write(block)


def size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def download_part(file: RemoteFile, part: Path) -> None:
    """Bring all of `file` into `part`, resuming from what `part` holds after any error. Gives up (InputError)
    after STALLED_ATTEMPTS attempts in a row that add no byte; the part is kept, for the next run to resume."""
    stalled, reached = 0, 0  # reached: the most bytes `part` has held; progress is going past it
    while True:
        offset = size_of(part) if file.size is not None else 0  # unknown size: no offset to trust
        if file.size is not None and offset >= file.size:
            return
        try:
            copy_from(file, part, offset)
            if file.size is None or size_of(part) >= file.size:
                return
            error = f"the transfer ended at byte {size_of(part):,} of {file.size:,}"
        except Exception as err:
            if out_of_space(err, part.parent):
                raise DiskFull(part) from None
            kind = timed_out(err)
            error = timeout_message("the transfer", kind) if kind else first_line(err)
        stalled = 0 if size_of(part) > reached else stalled + 1
        reached = max(reached, size_of(part))
        if stalled == STALLED_ATTEMPTS:
            raise InputError(f"data.source: cannot download {file.url}: {error} ({STALLED_ATTEMPTS} attempts in a "
                             f"row made no progress; rerun to resume from byte {size_of(part):,})")
        delay = BACKOFF_S * 2 ** max(stalled - 1, 0)
        log.warning("%s: %s; resuming from byte %d in %.0f s", file.url, error, size_of(part), delay)
        time.sleep(delay)


def download(file: RemoteFile, downloads: Path, locked: ManifestFile | None) -> tuple[Path, ManifestFile, bool]:
    """(the verified local copy of `file` in `downloads`, its manifest entry, whether it was downloaded now
    rather than found in the cache). `locked` is the existing manifest's entry for the same URL: its sha256 must
    hold, so a rerun brings the bytes of the first run or refuses."""
    pins = list(file.pins)
    if locked is not None:
        pins.append(Pin("sha256", locked.sha256, "the fetch manifest's; delete the manifest if the source changed "
                                                 "on purpose"))
    target = cache_path(downloads, file)
    if target.exists():
        why, sha256 = mismatch(target, file, pins)
        if why is None:
            return target, manifest_entry(file, target, sha256), False
        log.warning("%s: the cached copy differs (%s); downloading it again", file.url, why)
        target.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    if file.size is not None and size_of(part) > file.size:
        part.unlink()  # left by an earlier, longer version of the file
    log.info("downloading %s (%s)", file.url, "size unknown" if file.size is None else f"{file.size / 1e6:.1f} MB")
    download_part(file, part)
    why, sha256 = mismatch(part, file, pins)
    if why is not None:
        part.unlink()
        raise InputError(f"data.source: refused {file.url}: {why}; nothing of it was kept")
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, target)
    return target, manifest_entry(file, target, sha256), True


def manifest_entry(file: RemoteFile, local: Path, sha256: str) -> ManifestFile:
    return ManifestFile(file.name, local.stat().st_size, sha256, file.url, file.etag, file.revision)
