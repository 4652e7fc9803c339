"""Files: atomic writes (an artifact is either complete or absent, never half-written) and checked reads."""

import contextlib
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # disk full, quota, file-size limit (RLIMIT_FSIZE)
SPACE_MESSAGES = ("no space left", "file too large", "disk quota", "os error 28", "os error 27")
# What torch's and safetensors' writers say when a write fails, whatever the cause.
WRITE_FAILED_MESSAGES = ("write failed", "unexpected pos", "failed writing")


def out_of_space(err: BaseException, folder: Path) -> bool:
    """Whether `err`, raised while writing into `folder`, means there is no room: an OSError with the errno
    that says so, a library's message that says so, or a library's bare "write failed" while the disk is
    nearly full or a file-size limit is set."""
    if isinstance(err, OSError) and err.errno in SPACE_ERRNOS:
        return True
    message = str(err).lower()
    if any(text in message for text in SPACE_MESSAGES):
        return True
    if any(text in message for text in WRITE_FAILED_MESSAGES):
        limited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
        return limited or shutil.disk_usage(folder).free < 64 << 20
    return False


class DiskFull(InputError):
    def __init__(self, path: Path) -> None:
        self.path = path
        existing = next(folder for folder in path.parents if folder.exists())  # its folder may not exist yet
        free = shutil.disk_usage(existing).free / 1e6
        super().__init__(f"{path}: no space to write it (the disk is full, or over a quota or file-size limit; "
                         f"{free:,.0f} MB free on its file system); free some space and rerun")


@contextlib.contextmanager
def space_checked(path: Path, staging: Path | None = None) -> Iterator[None]:
    """Turn a write error that means "no room" into DiskFull naming `path`; let any other error through. A
    DiskFull from a write into `staging` (the temp folder that becomes `path`) names the file where it would
    have been: the temp folder is gone by the time the user reads the error."""
    try:
        yield
    except DiskFull as err:
        if staging is not None and err.path.is_relative_to(staging):
            raise DiskFull(path / err.path.relative_to(staging)) from None
        raise
    except Exception as err:
        if out_of_space(err, path.parent):
            raise DiskFull(path) from None
        raise


def _temp_prefix(path: Path) -> str:
    """Temp files and folders beside `path` carry the writer's pid, so a later writer can tell the leftovers
    of a killed one (pid gone) from those of a live one."""
    return f".{path.name}.pid{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temps(folder: Path, name: str) -> None:
    """Remove what killed writers left in `folder` of artifacts whose name matches the regex `name`: temp
    files and folders (`.NAME.pidN.*.tmp`) and a replaced folder not yet deleted (`.NAME.old-N`)."""
    pattern = re.compile(rf"\.(?:{name})\.(?:pid(?P<pid>\d+)\..*\.tmp|old-(?P<old>\d+))")
    if not folder.is_dir():
        return
    for leftover in folder.iterdir():
        found = pattern.fullmatch(leftover.name)
        if found and not _pid_alive(int(found["pid"] or found["old"])):
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, re.escape(path.name))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; artifacts get the usual permissions
    try:
        with space_checked(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_utf8(path: str | Path) -> str:
    """A UTF-8 text file's content; a missing, unreadable or non-UTF-8 file is an InputError naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, re.escape(path.name))
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        with space_checked(path, staging=tmp):
            yield tmp
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
