"""The train and evaluate stages as DVC runs them: outputs, metrics, and one MLflow run holding the
training's params, metrics and artifacts, to which evaluation adds its own."""

import json
import math
import re
import shutil
import threading
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from llm.evaluate import score_shards, token_byte_lengths
from llm.lineage import dvc_hash
from llm.model_io import load_model_dir
from llm.shards import read_meta
from tests.conftest import TINY_MODEL, TINY_TRAIN, only_mlflow_run, read_json, run_stage, write_params

pytestmark = pytest.mark.slow

TINY = {"model": TINY_MODEL, "train": TINY_TRAIN}


def stage(cwd, *args):
    return run_stage(cwd, *args, env={"HOME": str(cwd)})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_project):
    """A project folder with the data stages already run on a small corpus."""
    work = tmp_path_factory.mktemp("project")
    return data_project(work, mlflow={"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "test"}, **TINY)


@pytest.fixture(scope="module")
def trained(workdir):
    """The project after the train stage has run (measuring the peak FLOP/s, as a user's run does)."""
    result = run_stage(workdir, "train", env={"HOME": str(workdir), "LLM_PEAK_FLOPS": ""})
    assert result.returncode == 0, result.stderr
    return result


def test_train_stage_writes_the_contract_outputs_and_one_mlflow_run(workdir, trained):
    result = trained
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
    assert metrics["peak_flops_source"] == "measured float32 matmul on cpu"
    flops_per_sec = metrics["tokens_per_sec"] * metrics["flops_per_token"]
    assert metrics["mfu"] == pytest.approx(flops_per_sec / metrics["peak_flops"])
    val = read_meta(workdir / "data/tokens").splits["val"]
    assert metrics["val_bpb_estimate"] == pytest.approx(metrics["val_loss"] * val.tokens / val.bytes / math.log(2))
    rows = (workdir / "plots/train.csv").read_text().splitlines()
    assert rows[0] == "step,tokens_seen,train_loss,val_loss,lr,grad_norm,tokens_per_sec,mfu" and len(rows) == 1 + 4

    client, run = only_mlflow_run(f"sqlite:///{workdir}/mlflow.db", "test")
    assert run.info.run_id == metrics["mlflow_run_id"] == read_json(final / "mlflow_run.json")["run_id"]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.max_steps"] == "12" and params["data.val_fraction"]
    assert params["model.arch"] == yaml.safe_load((workdir / "params.yaml").read_text())["model"]["arch"]
    assert "data_tokenizer_sha256" in params and "git_commit" in params
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [3, 6, 9, 12]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [6, 12]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "tokenizer.json", "train.csv", "model"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.safetensors"}


def test_the_training_run_records_its_inputs_the_machine_and_a_run_card(workdir, trained):
    from mlflow.artifacts import load_text

    client, run = only_mlflow_run(f"sqlite:///{workdir}/mlflow.db", "test")
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts == {"tokens": "training", "tokens/val": "validation", "tokenizer": "tokenizer"}
    meta = read_meta(workdir / "data/tokens")
    assert inputs["tokens"].dataset.digest == dvc_hash(workdir / "data/tokens")
    profile = json.loads(inputs["tokens"].dataset.profile)
    assert (profile["train_tokens"], profile["val_tokens"]) == (meta.splits["train"].tokens, meta.splits["val"].tokens)
    assert json.loads(inputs["tokens/val"].dataset.profile)["tokens"] == meta.splits["val"].tokens
    assert inputs["tokenizer"].dataset.digest == meta.tokenizer_sha256[:36]

    tags = run.data.tags
    assert tags["git_dirty"] == "unknown" and tags["params_changed"].startswith("unknown"), "not a git repository"
    assert tags["card.device"] == "cpu" and tags["card.cpu_bf16"] in ("true", "false") and tags["card.cpu_model"]
    assert tags["card.dtype"] == "float32" and int(tags["card.cpu_cores"]) >= 1 and tags["card.gpu"] == "none"
    assert 0 < float(tags["card.wall_seconds.train"]) < 600
    card = load_text(f"{run.info.artifact_uri}/run_card.md")
    assert f"| CPU | {tags['card.cpu_model']} |" in card and f"| train | {tags['card.wall_seconds.train']} |" in card

    # The machine during the training, from MLflow's system metrics monitor: at least its last point.
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage"):
        assert client.get_metric_history(run.info.run_id, f"system/{key}"), key
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu[-1].value > 0, "the last point measures the run's end, on the monitor's thread"


def test_rerunning_a_finished_training_reopens_its_run_and_keeps_its_history(workdir, trained):
    before = read_json(workdir / "metrics/train.json")
    table = (workdir / "plots/train.csv").read_text()
    first = before["mlflow_run_id"]
    result = stage(workdir, "train")
    assert result.returncode == 0, result.stderr
    assert "reopened" in result.stderr and "already completes this run" in result.stderr
    after = read_json(workdir / "metrics/train.json")
    assert after["mlflow_run_id"] == first
    # The history comes back from the checkpoint: the same loss table and losses, not an empty one.
    assert (workdir / "plots/train.csv").read_text() == table
    assert (after["train_loss"], after["val_loss"], after["steps"]) == (
        before["train_loss"], before["val_loss"], before["steps"])
    client, run = only_mlflow_run(f"sqlite:///{workdir}/mlflow.db", "test")
    assert run.info.run_id == first and run.info.status == "FINISHED"


def test_a_tracking_server_down_at_the_start_does_not_stop_training(workdir, tmp_path):
    """The contract: a failing tracker never stops training; it is reported at the end."""
    down = write_params(tmp_path / "params.yaml", **{**TINY, "mlflow": {"tracking_uri": "http://127.0.0.1:9",
                                                                       "experiment": "x"}})
    out = {name: tmp_path / name for name in ("ckpt", "final", "train.json", "train.csv")}
    result = stage(workdir, "train", "--params", str(down), "--checkpoints", out["ckpt"], "--out", out["final"],
                   "--metrics", out["train.json"], "--plots", out["train.csv"])
    assert result.returncode == 0, result.stderr
    assert "training goes on without tracking" in result.stderr
    assert "was not tracked" in result.stderr.strip().splitlines()[-2], "the end says so"
    metrics = read_json(out["train.json"])
    assert metrics["steps"] == 12 and metrics["mlflow_run_id"] is None
    assert (out["final"] / "model.safetensors").is_file()


def test_evaluate_stage_writes_metrics_reports_and_logs_into_the_training_run(workdir, trained):
    result = stage(workdir, "evaluate")
    assert result.returncode == 0, result.stderr

    metrics = read_json(workdir / "metrics/eval.json")
    val = read_meta(workdir / "data/tokens").splits["val"]
    model, tokenizer = load_model_dir(workdir / "models/final")
    shards = [workdir / "data/tokens" / name for name in val.shards]
    direct = score_shards(model, shards, token_byte_lengths(tokenizer))
    assert metrics["val_tokens"] == direct.tokens == val.tokens - len(shards)
    assert metrics["val_loss"] == pytest.approx(direct.loss, rel=1e-6)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_bpb"] == pytest.approx(direct.nats / math.log(2) / direct.bytes, rel=1e-6)
    assert metrics["val_bytes"] == val.bytes  # every byte of the val text, once

    reports = workdir / "reports"
    samples = (reports / "samples.md").read_text()
    prompts = yaml.safe_load((workdir / "params.yaml").read_text())["evaluate"]["prompts"]
    assert samples.count("## Sample ") == len(prompts)
    # init, the checkpoint at step 6 (the one at 12 is the final model), final
    pictures = ["loss.png", "attention_evolution.png", "attention/step_000000.png", "attention/step_000006.png",
                "attention/final.png"]
    assert sorted(str(p.relative_to(reports)) for p in reports.rglob("*.png")) == sorted(pictures)
    for name in pictures:
        image = np.asarray(Image.open(reports / name).convert("RGB"))
        assert image.shape[0] > 200 and image.shape[1] > 200
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, f"{name} looks blank"

    client, run = only_mlflow_run(f"sqlite:///{workdir}/mlflow.db", "test")
    assert run.info.run_id == metrics["mlflow_run_id"]
    assert run.info.run_id == read_json(workdir / "metrics/train.json")["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/val_bpb"] == pytest.approx(metrics["val_bpb"])
    assert run.data.metrics["eval/val_loss"] == pytest.approx(metrics["val_loss"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/samples.md", "eval/loss.png", "eval/attention", "eval/eval.json"} <= logged


def test_an_empty_meta_json_is_one_line_and_exit_2(workdir, tmp_path):
    shutil.copytree(workdir / "data/tokens", tmp_path / "tokens")
    (tmp_path / "tokens/meta.json").write_text("{}")
    result = stage(workdir, "train", "--tokens", tmp_path / "tokens", "--checkpoints", tmp_path / "ckpt",
                   "--out", tmp_path / "final")
    assert result.returncode == 2
    assert "meta.json" in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "final").exists()


TIMING = {"tokens_per_sec", "mfu", "peak_flops", "peak_flops_source"}  # measured, so they differ between any two runs


def without_timing(csv: str) -> list[list[str]]:
    rows = [line.split(",") for line in csv.splitlines()]
    kept = [i for i, name in enumerate(rows[0]) if name not in TIMING]
    return [[row[i] for i in kept] for row in rows]


@pytest.mark.parametrize("when", ["from the start", "after the run opened"])
def test_a_locked_tracker_neither_stalls_training_nor_changes_its_outputs(workdir, trained, tmp_path, monkeypatch,
                                                                         empty_mlflow_db, when):
    """An exclusive lock on mlflow.db held by another connection for as long as the training runs (another
    process writing, a `dvc exp run` beside it): MLflow waits 20 s per call on it, yet the training takes no
    longer than FINISH_WAIT_S more than it would untracked (every MLflow call is on a thread of its own, which
    the loop never waits on), its outputs are those of the tracked training, and the end says what was not
    logged, in one line besides at most one warning, without MLflow's tracebacks."""
    import llm.tracking
    import llm.training_run
    from tests.test_tracking import locked, mlflow_noise

    for wait in ("TRACKER_WAIT_S", "FINISH_WAIT_S"):
        monkeypatch.setattr(llm.tracking, wait, 1.0)
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_mlflow_db, db)
    params = write_params(tmp_path / "params.yaml", **{**TINY, "mlflow": {"tracking_uri": f"sqlite:///{db}",
                                                                         "experiment": "locked"}})
    lock = locked(db)
    if when == "from the start":
        lock.__enter__()
    else:
        start_training_run = llm.training_run.start_training_run

        def opened_then_locked(*args, **kwargs):
            run = start_training_run(*args, **kwargs)
            assert run.run_id is not None
            lock.__enter__()
            return run

        monkeypatch.setattr(llm.training_run, "start_training_run", opened_then_locked)
    out = {name: tmp_path / name for name in ("ckpt", "final", "train.json", "train.csv", "attention.safetensors")}
    monitors_before = set(system_metrics_monitors())
    try:
        start = time.monotonic()
        result = stage(workdir, "train", "--params", params, "--checkpoints", out["ckpt"], "--out", out["final"],
                       "--metrics", out["train.json"], "--plots", out["train.csv"], "--attention",
                       out["attention.safetensors"])
        elapsed = time.monotonic() - start
    finally:
        lock.__exit__(None, None, None)
    print(f"{when}: {elapsed:.1f} s")

    assert result.returncode == 0, result.stderr
    assert elapsed < 20, "not one of MLflow's 20 s waits on a locked database"
    metrics, tracked = read_json(out["train.json"]), read_json(workdir / "metrics/train.json")
    ignored = TIMING | {"mlflow_run_id", "resumed_from_step"}  # the tracked training may have been rerun
    assert {k: v for k, v in metrics.items() if k not in ignored} == \
        {k: v for k, v in tracked.items() if k not in ignored}
    for name, tracked_path in (("final", "models/final/model.safetensors"), ("attention.safetensors",
                                                                            "plots/attention.safetensors")):
        path = out[name] / "model.safetensors" if name == "final" else out[name]
        assert path.read_bytes() == (workdir / tracked_path).read_bytes(), name
    assert without_timing(out["train.csv"].read_text()) == without_timing((workdir / "plots/train.csv").read_text())

    lines = result.stderr.strip().splitlines()
    *warnings, report = [line for line in lines if line.startswith("MLflow at")]
    assert report == lines[-2], "said at the end, before the summary"
    if when == "from the start":
        [warning] = warnings
        assert "is not usable (no answer in 1 s): training goes on without tracking" in warning
        assert metrics["mlflow_run_id"] is None and "the training was not tracked" in report
    else:  # the tracker never answered after the run opened: the one line is the report
        assert not warnings
        assert metrics["mlflow_run_id"] is not None
        assert "metric values and 4 artifacts of run" in report and "nor its end (FINISHED)" in report
        assert "(no answer in 1 s)" in report
    assert not mlflow_noise(result.stderr)
    # MLflow's monitor of the machine stops with the stage, though the tracker never ended the run.
    deadline = time.monotonic() + 30
    while set(system_metrics_monitors()) - monitors_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(system_metrics_monitors()) - monitors_before


def system_metrics_monitors() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "SystemMetricsMonitor"]


def test_a_locked_or_corrupt_tracker_neither_stops_nor_stalls_the_guide(workdir, trained, tmp_path, monkeypatch):
    """The guide with the training's run tracked, its database corrupt or locked by another connection for as long
    as the stage runs: exit 0, the whole guide (its experiments chapter says the runs could not be listed; its
    figures those of a guide built untracked), a warning for the run it could not add to and one for the runs it
    could not list, no MLflow traceback, and one wait of TRACKER_WAIT_S, not MLflow's 20 s per call."""
    import llm.tracking
    from tests.test_tracking import locked, mlflow_noise

    for wait in ("TRACKER_WAIT_S", "FINISH_WAIT_S"):
        monkeypatch.setattr(llm.tracking, wait, 1.0)
    if not (workdir / "metrics/eval.json").is_file():
        assert stage(workdir, "evaluate").returncode == 0
    db = workdir / "mlflow.db"
    saved = db.read_bytes()
    try:
        db.write_bytes(b"not a database" * 1000)
        start = time.monotonic()
        corrupt = stage(workdir, "guide", "--out", tmp_path / "corrupt")
        untracked_elapsed = time.monotonic() - start
        db.write_bytes(saved)
        with locked(db):
            start = time.monotonic()
            result = stage(workdir, "guide", "--out", tmp_path / "locked")
            elapsed = time.monotonic() - start
    finally:
        db.write_bytes(saved)

    for built, answer in ((corrupt, r"\(sqlite3.DatabaseError\) file is not a database"),
                          (result, r"no answer in 1 s")):
        assert built.returncode == 0, built.stderr
        lines = built.stderr.strip().splitlines()
        found, listed, report = [line for line in lines if "MLflow" in line]
        assert re.search(f"not reachable \\({answer}\\): the guide is not logged to MLflow", found)
        assert re.search(f"is not usable \\({answer}.*\\): the guide lists no runs", listed)
        assert "the guide was not tracked (0 metric values, 1 artifacts not logged)" in report
        assert report == lines[-1]
        assert not mlflow_noise(built.stderr)
    assert elapsed < untracked_elapsed + 10, "one short wait, not MLflow's 20 s per call on a locked database"

    def files(folder):
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())

    assert files(tmp_path / "locked") == files(tmp_path / "corrupt")
    for name in ("corrupt", "locked"):  # the page's timings are measured as it is built: its words differ
        assert "The runs could not be listed: MLflow at " in (tmp_path / name / "index.html").read_text()
    # The memmap figure is measured too: the pages a read maps depend on what the page cache holds (the kernel maps
    # cached pages around a faulting one), which the first build changes for the second.
    for name in files(tmp_path / "locked"):
        if name.suffix in (".png", ".gif") and name.name != "memmap.png":
            assert (tmp_path / "locked" / name).read_bytes() == (tmp_path / "corrupt" / name).read_bytes(), name
