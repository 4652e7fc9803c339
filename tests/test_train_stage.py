"""The train stage as DVC runs it: outputs, metrics, and one MLflow run holding params, metrics, artifacts."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, data_project, read_json, write_params

pytestmark = pytest.mark.slow

TINY = {
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
    "train": {"batch_size": 4, "max_steps": 12, "warmup_steps": 2, "eval_interval": 6, "eval_batches": 2,
              "log_interval": 3, "checkpoint_interval": 6, "dtype": "float32"},
}


def stage(cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A project folder with the data stages already run on a small corpus."""
    work = tmp_path_factory.mktemp("project")
    return data_project(work, mlflow={"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "test"}, **TINY)


def test_train_stage_writes_the_contract_outputs_and_one_mlflow_run(workdir):
    result = stage(workdir, "train")
    assert result.returncode == 0, result.stderr
    assert "step 12/12" in result.stderr, "plain progress lines when not on a terminal"

    final = workdir / "models/final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "mlflow_run.json", "model.safetensors",
                                                        "tokenizer.json"]
    config = read_json(final / "config.json")
    assert config["vocab_size"] == 300 and config["n_layer"] == 2
    metrics = read_json(workdir / "metrics/train.json")
    for key in ("train_loss", "val_loss", "tokens_per_sec", "mfu", "steps", "tokens_seen"):
        assert key in metrics
    assert metrics["steps"] == 12 and metrics["tokens_seen"] == 12 * 4 * 32
    rows = (workdir / "plots/train.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,val_loss,lr,tokens_per_sec" and len(rows) == 1 + 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    [experiment] = [e for e in client.search_experiments() if e.name == "test"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == metrics["mlflow_run_id"] == read_json(final / "mlflow_run.json")["run_id"]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.max_steps"] == "12" and params["model.arch"] == "gpt2" and params["data.val_fraction"]
    assert "data_tokenizer_sha256" in params and "git_commit" in params
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [3, 6, 9, 12]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [6, 12]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "tokenizer.json", "train.csv", "model"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.safetensors"}


def test_an_unusable_tracking_uri_fails_before_training(workdir, tmp_path):
    bad = write_params(tmp_path / "params.yaml", **{**TINY, "mlflow": {"tracking_uri": "http://127.0.0.1:9",
                                                                      "experiment": "x"}})
    result = stage(workdir, "train", "--params", str(bad), "--checkpoints", str(tmp_path / "ckpt"))
    assert result.returncode == 2
    assert "mlflow.tracking_uri" in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "ckpt").exists()
