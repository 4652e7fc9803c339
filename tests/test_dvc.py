"""`dvc repro` reruns exactly the stages a change affects (run in a temporary git repo)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, read_json

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout


def repro(repo: Path, *targets: str) -> set[str]:
    """Run `dvc repro [targets]`; return the stages whose commands actually ran."""
    return set(re.findall(r"Running stage '(\w+)'", run(["dvc", "repro", *targets], repo)))


def edit_params(repo: Path, section: str, key: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params))


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for package in ("llm", "stages"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"play{i:02d}.txt").write_text(f"Act {i}. " + "What light through yonder window breaks? " * (3 + i))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source=str(corpus), val_fraction=0.25)
    params["clean"]["min_chars"] = 10
    params["tokenizer"].update(vocab_size=300, min_frequency=1)
    params["tokenize"]["num_workers"] = 1
    params["model"].update(n_layer=1, n_head=2, n_embd=16, block_size=16)
    params["train"].update(batch_size=2, max_steps=4, warmup_steps=1, eval_interval=2, eval_batches=1, log_interval=2,
                           checkpoint_interval=2, dtype="float32")
    params["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    return repo


def test_repro_reruns_only_what_a_change_affects(repo):
    assert repro(repo) == {"fetch", "clean", "tokenizer", "tokenize", "train"}
    assert read_json(repo / "metrics/clean.json")["documents_out"] == 24
    assert read_json(repo / "metrics/train.json")["steps"] == 4
    assert repro(repo) == set(), "a no-op repro does nothing"
    assert "up to date" in run(["dvc", "status"], repo)

    (repo / "params.yaml").write_text("# a comment only\n" + (repo / "params.yaml").read_text())
    assert repro(repo) == set()

    # The data stages, up to tokenize: each change reruns its stage and what depends on it.
    edit_params(repo, "tokenizer", "vocab_size", 280)
    assert repro(repo, "tokenize") == {"tokenizer", "tokenize"}
    assert read_json(repo / "data/tokens/meta.json")["vocab_size"] == 280

    edit_params(repo, "clean", "min_chars", 200)  # drops the shortest plays
    assert repro(repo, "tokenize") == {"clean", "tokenizer", "tokenize"}
    assert read_json(repo / "metrics/clean.json")["dropped"]["too_short"] > 0

    edit_params(repo, "tokenize", "shard_tokens", 1000)
    assert repro(repo, "tokenize") == {"tokenize"}

    assert repro(repo) == {"train"}, "new token shards retrain"
    edit_params(repo, "train", "lr", 0.01)
    assert repro(repo) == {"train"}
    assert read_json(repo / "metrics/train.json")["resumed_from_step"] == 0, "new params start a fresh run"
