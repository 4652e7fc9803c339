"""Where the project is: its root folder (the repository, also from inside a DVC experiment's temporary copy), the
workspace a stage runs in (that copy, when there is one), and what git says of them: the commit checked out, the
files that differ from it."""

import subprocess
from pathlib import Path


def project_root() -> Path:
    """The outermost folder above the working directory that holds .dvc/: the repository, also when DVC
    runs an experiment in a temporary copy inside it."""
    here = Path.cwd().resolve()
    roots = [p for p in (here, *here.parents) if (p / ".dvc").is_dir()]
    return roots[-1] if roots else here


def workspace_root() -> Path:
    """The innermost folder above the working directory that holds .dvc/: the repository, or the temporary copy
    that `dvc exp run --temp` (and the queue) runs an experiment in, whose dvc.lock and files are the run's."""
    here = Path.cwd().resolve()
    return next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), here)


def git_output(root: Path, *args: str) -> str | None:
    """What `git ARGS` prints at `root`; None outside a git repository, without git, or when it fails."""
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # git not installed: a run is still recorded, without it
        return None
    return result.stdout if result.returncode == 0 else None


def git_commit(root: Path) -> str:
    """The commit checked out at `root`, or "unknown" outside a git repository (or without git)."""
    output = git_output(root, "rev-parse", "HEAD")
    return "unknown" if output is None else output.strip()


def dirty_files(root: Path, ignored: tuple[str, ...] = ()) -> list[str] | None:
    """Tracked files at `root` that differ from the commit checked out, but for `ignored`; None outside git."""
    status = git_output(root, "status", "--porcelain", "--untracked-files=no")
    if status is None:
        return None
    return [path for path in (line[3:] for line in status.splitlines() if len(line) > 3) if path not in ignored]
