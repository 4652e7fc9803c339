"""`dvc repro` reruns exactly the stages a change affects, and `dvc exp` runs and compares experiments
(in a temporary git repo)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, read_json
from tests.test_sft import play_text

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result.stdout


def dvc_fails(repo: Path, *args: str) -> str:
    """Run a dvc command that must fail; its stderr."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode != 0, f"dvc {args} succeeded: {result.stdout}"
    return result.stderr


def repro(repo: Path, *targets: str) -> set[str]:
    """Run `dvc repro [targets]`; return the stages whose commands actually ran."""
    return ran(run(["dvc", "repro", *targets], repo))


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def edit_params(repo: Path, section: str, key: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params))


@pytest.fixture
def repo(tmp_path, empty_mlflow_db):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(empty_mlflow_db, repo / "mlflow.db")
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for package in ("llm", "stages"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"play{i:02d}.txt").write_text(f"Act {i}. " + "What light through yonder window breaks? " * (3 + i))
    for i in range(8):  # plays, for the sft stage's built-in conversations
        (corpus / f"drama{i}.txt").write_text(play_text(i))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source=str(corpus), val_fraction=0.25)
    params["clean"]["min_chars"] = 10
    params["tokenizer"].update(vocab_size=300, min_frequency=1)
    params["tokenize"]["num_workers"] = 1
    params["model"].update(n_layer=1, n_head=2, n_embd=16, block_size=256)  # the context conversations need
    params["train"].update(batch_size=2, max_steps=4, warmup_steps=1, eval_interval=2, eval_batches=1, log_interval=2,
                           checkpoint_interval=4, dtype="float32")
    params["evaluate"].update(max_new_tokens=8, prompts=["Act 1.", ""])
    params["sft"].update(train_conversations=40, questions_per_task=2, shots=1, max_steps=2, batch_size=2,
                         warmup_steps=1, eval_interval=2, eval_batches=1, log_interval=1, checkpoint_interval=2)
    params["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    return repo


def test_repro_reruns_only_what_a_change_affects_and_experiments_compare(repo):
    everything = {"fetch", "clean", "tokenizer", "tokenize", "train", "evaluate", "fetch-sft", "sft", "guide"}
    assert repro(repo) == everything
    assert read_json(repo / "metrics/clean.json")["documents_out"] == 32
    assert read_json(repo / "metrics/sft.json")["steps"] == 2
    assert read_json(repo / "metrics/train.json")["steps"] == 4
    assert read_json(repo / "metrics/eval.json")["val_bpb"] > 0
    guide = (repo / "reports/guide/index.html").stat().st_mtime_ns
    assert repro(repo) == set(), "a no-op repro does nothing"
    assert (repo / "reports/guide/index.html").stat().st_mtime_ns == guide
    assert "up to date" in run(["dvc", "status"], repo)

    (repo / "params.yaml").write_text("# a comment only\n" + (repo / "params.yaml").read_text())
    assert repro(repo) == set()

    # A stage that fails under `dvc repro` leaves its last good outputs: DVC deletes the outputs of a stage
    # before running it unless they are `persist: true`, as every out in dvc.yaml is.
    good_params = (repo / "params.yaml").read_text()
    outputs = ["metrics/eval.json", "reports/samples.md", "reports/attention_evolution.png",
               "models/tokenizer/tokenizer.json", "metrics/tokenizer.json"]
    before = {path: (repo / path).read_bytes() for path in outputs}
    edit_params(repo, "evaluate", "max_new_tokens", 0)  # refused by the evaluate stage, after DVC began it
    assert "evaluate.max_new_tokens" in dvc_fails(repo, "repro", "evaluate")
    edit_params(repo, "tokenizer", "vocab_size", 10)
    assert "tokenizer.vocab_size" in dvc_fails(repo, "repro", "tokenizer")
    assert {path: (repo / path).read_bytes() for path in outputs} == before
    (repo / "params.yaml").write_text(good_params)
    assert "up to date" in run(["dvc", "status"], repo), "the kept outputs are the ones dvc.lock names"

    # A second `dvc repro` while one holds an output is refused with the message the README quotes.
    rwlock = repo / ".dvc" / "tmp" / "rwlock"
    rwlock.write_text(json.dumps({"read": {}, "write": {str(repo / "metrics" / "eval.json"):
                                                        {"pid": os.getpid(), "cmd": "dvc repro"}}}))
    refused = dvc_fails(repo, "repro", "-f", "evaluate")
    rwlock.unlink()
    assert "is busy, it is being blocked by" in refused and f"(PID {os.getpid()})" in refused
    assert "is busy, it is being blocked by" in (ROOT / "README.md").read_text()

    # From here on the guide is left out (`dvc repro evaluate`): it would only rerun each time. What would
    # rerun is what `dvc status` lists.
    edit_params(repo, "evaluate", "temperature", 0.5)
    assert set(json.loads(run(["dvc", "status", "--json"], repo))) == {"evaluate", "guide"}, \
        "sampling settings rerun the samples and the guide, not train"
    assert repro(repo, "evaluate") == {"evaluate"}

    edit_params(repo, "train", "lr", 0.01)
    assert repro(repo, "evaluate") == {"train", "evaluate"}
    assert read_json(repo / "metrics/train.json")["resumed_from_step"] == 0, "new params start a fresh run"

    # The data stages, up to tokenize (`dvc repro tokenize`): each change reruns its stage and what depends
    # on it; the training on the new shards comes once at the end.
    edit_params(repo, "tokenizer", "vocab_size", 280)
    assert repro(repo, "tokenize") == {"tokenizer", "tokenize"}
    assert read_json(repo / "data/tokens/meta.json")["vocab_size"] == 280

    edit_params(repo, "clean", "min_chars", 200)  # drops the shortest plays
    assert repro(repo, "tokenize") == {"clean", "tokenizer", "tokenize"}
    assert read_json(repo / "metrics/clean.json")["dropped"]["too_short"] > 0

    edit_params(repo, "tokenize", "shard_tokens", 1000)
    assert repro(repo, "tokenize") == {"tokenize"}
    assert repro(repo, "evaluate") == {"train", "evaluate"}, "new token shards retrain"
    assert read_json(repo / "metrics/train.json")["resumed_from_step"] == 0

    # Experiments: commit this state as the baseline, run one with another learning rate, compare.
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)

    output = run(["dvc", "exp", "run", "-n", "lr-low", "-S", "train.lr=0.005", "evaluate"], repo)
    assert ran(output) == {"train", "evaluate"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 0.005

    # The experiment's MLflow run is named after it, says what changed from the baseline's params, and records the
    # data it trained on by the hashes dvc.lock holds (llm/lineage.py computes them as DVC does).
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    name = yaml.safe_load((repo / "params.yaml").read_text())["mlflow"]["experiment"]
    experiment = client.get_experiment_by_name(name)
    [exp_run] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'lr-low'")
    tags = exp_run.data.tags
    assert tags["dvc_exp_name"] == "lr-low" and tags["params_changed.train.lr"] == "0.01 -> 0.005"
    assert tags["params_changed"] == "1" and tags["git_dirty"] == "true" and "params.yaml" in tags["git_dirty_files"]
    lock = {stage: {out["path"]: out["md5"] for out in locked.get("outs", [])}
            for stage, locked in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].items()}
    [tokens] = [d.dataset for d in exp_run.inputs.dataset_inputs if d.dataset.name == "tokens"]
    assert tokens.digest == lock["tokenize"]["data/tokens"] == tags["dvc.tokenize.data/tokens"]
    assert tags["dvc.clean.data/clean"] == lock["clean"]["data/clean"] and tags["dvc.fetch.data/raw"]
    assert not any(key.startswith("dvc.evaluate.") for key in tags), "upstream stages only"

    rows = json.loads(run(["dvc", "exp", "show", "--json"], repo))
    experiments = {}
    for row in rows:  # the baseline commit (and the workspace), each with its experiments
        for exp in [row, *[e for ex in row.get("experiments") or [] for e in ex.get("revs", [])]]:
            data = exp.get("data") or {}
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = data.get("metrics", {}).get("metrics/eval.json", {}).get("data", {})
            if params and metrics:
                experiments[exp.get("name") or exp["rev"]] = (params["train"]["lr"], metrics["val_bpb"])
    assert "lr-low" in experiments and experiments["lr-low"][0] == 0.005
    assert any(lr == 0.01 for name, (lr, _) in experiments.items() if name != "lr-low"), experiments
    assert all(bpb > 0 for _, bpb in experiments.values())

    diff = run(["dvc", "metrics", "diff", "--json"], repo)  # workspace (lr-low) against the baseline commit
    assert "metrics/eval.json" in json.loads(diff)
