"""Where the project is: its root folder (the repository, also from inside a DVC experiment's temporary copy)
and the git commit checked out there."""

import subprocess
from pathlib import Path


def project_root() -> Path:
    """The outermost folder above the working directory that holds .dvc/: the repository, also when DVC
    runs an experiment in a temporary copy inside it."""
    here = Path.cwd().resolve()
    roots = [p for p in (here, *here.parents) if (p / ".dvc").is_dir()]
    return roots[-1] if roots else here


def git_commit(root: Path) -> str:
    """The commit checked out at `root`, or "unknown" outside a git repository (or without git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:  # git not installed: a run is still recorded, without its commit
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"
