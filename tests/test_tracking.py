"""A tracker that fails after a stage found its run (a database that goes away, a server that errors) never stops the
stage nor changes its outputs: what was not logged is reported at the end, in one line, without MLflow's tracebacks.
And a run that cannot be looked up (a corrupt database, a server down) means an untracked stage, not a failed one.
In process: the evaluate stage through typer's CliRunner, the tracker's failures made real or monkeypatched in."""

import contextlib
import json
import logging
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llm.config import EOT
from llm.configs.mlflow import MlflowConfig
from llm.fileio import sha256_file
from llm.shards import ShardWriter, SplitMeta, TokensMeta, token_dtype, write_meta
from llm.tokenizer import load_tokenizer
from llm.tracking import MODEL_RUN_FILE, ExistingRun, Job, TrackerThread, UntrackedRun, run_of_model
from stages.__main__ import app
from tests.conftest import make_model_dir, read_json, write_params

EVALUATION = Job("evaluation", "metrics/eval.json, reports")


@pytest.fixture
def mlflow_records():
    """Every record MLflow's loggers pass to their handlers (the terminal) while the test runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mlflow")  # its children's records reach its handlers, not the root's
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture
def project(tmp_path, monkeypatch, sample_tokenizer_path, empty_mlflow_db) -> dict[str, Path]:
    """A model folder whose training's run is in an sqlite MLflow database, val token shards made with its
    tokenizer, and params.yaml pointing at that database: what the evaluate stage reads."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    model = make_model_dir(tmp_path / "final", sample_tokenizer_path)
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("eval", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    (model / MODEL_RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))

    tokenizer = load_tokenizer(model / "tokenizer.json")
    vocab, eot = tokenizer.get_vocab_size(), tokenizer.token_to_id(EOT)
    ids = tokenizer.encode("But soft, what light through yonder window breaks? " * 8).ids
    val = np.array([eot, *ids], dtype=np.int64)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    writer = ShardWriter(tokens, "val", token_dtype(vocab), shard_tokens=10**6)
    writer.write(val)
    shards = tuple(p.name for p in writer.close())
    write_meta(tokens, TokensMeta(vocab, token_dtype(vocab).name, eot, sha256_file(model / "tokenizer.json"), 10**6,
                                  {"train": SplitMeta(0, 0, 0, ()), "val": SplitMeta(1, len(val), 400, shards)}))
    params = write_params(tmp_path / "params.yaml", evaluate={"prompts": ["But soft"], "max_new_tokens": 4},
                          mlflow={"tracking_uri": uri, "experiment": "eval"})
    return {"root": tmp_path, "model": model, "tokens": tokens, "params": params, "db": tmp_path / "mlflow.db",
            "uri": uri, "run_id": run_id}


def evaluate(project: dict[str, Path], out: str):
    """The evaluate stage in process, writing into project/out: (result, metrics path, reports path)."""
    root = project["root"]
    metrics, reports = root / out / "eval.json", root / out / "reports"
    root_log = logging.getLogger()
    handlers, level = root_log.handlers[:], root_log.level
    try:
        result = CliRunner().invoke(app, [
            "evaluate", "--params", str(project["params"]), "--model", str(project["model"]),
            "--tokens", str(project["tokens"]), "--checkpoints", str(root / "no-checkpoints"),
            "--train-plots", str(root / "no-train.csv"), "--metrics", str(metrics), "--reports", str(reports)])
    finally:  # the stage pointed logging at CliRunner's stderr, which is closed once it returns
        root_log.handlers[:] = handlers
        root_log.setLevel(level)
    return result, metrics, reports


def failing(*args, **kwargs):
    from mlflow.exceptions import MlflowException

    # What a tracking server in trouble answers: a first line, then pages of its own.
    raise MlflowException("API request failed with error code 503 != 200\n<html>" + "<p>busy</p>\n" * 200)


def test_evaluate_writes_the_same_outputs_when_the_tracker_fails_after_the_run_was_found(project, monkeypatch,
                                                                                         mlflow_records):
    from mlflow import MlflowClient

    tracked, tracked_metrics, tracked_reports = evaluate(project, "tracked")
    assert tracked.exit_code == 0, tracked.output
    run = MlflowClient(project["uri"]).get_run(project["run_id"])
    assert run.data.metrics["eval/val_bpb"] == pytest.approx(read_json(tracked_metrics)["val_bpb"])
    assert "logged the evaluation to MLflow run" in tracked.stderr

    # The run is found (get_run still answers); every send after that fails.
    for method in ("log_batch", "log_artifact", "log_artifacts"):
        monkeypatch.setattr(MlflowClient, method, failing)
    result, metrics, reports = evaluate(project, "down")

    assert result.exit_code == 0, result.output
    assert metrics.read_bytes() == tracked_metrics.read_bytes(), "the tracker changes none of the outputs"
    assert read_json(metrics)["mlflow_run_id"] == project["run_id"]
    assert sorted(p.relative_to(reports) for p in reports.rglob("*")) == \
        sorted(p.relative_to(tracked_reports) for p in tracked_reports.rglob("*"))
    lines = result.stderr.strip().splitlines()
    [warning] = [line for line in lines if "failed (" in line]
    assert "evaluation goes on" in warning and "error code 503" in warning
    [report] = [line for line in lines if "could not be logged" in line]
    assert report == lines[-1], "reported at the end"
    assert f"5 metric values and 4 artifacts of run {project['run_id']} could not be logged" in report
    assert f"the outputs ({metrics}, {reports}) are complete" in report
    assert "<html>" not in result.output and "Traceback" not in result.output
    assert not [r for r in mlflow_records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("damage", ["removed", "corrupt"])
def test_a_database_that_fails_after_the_run_was_found_stops_nothing(project, caplog, mlflow_records, damage):
    """The real thing: SQLite refuses writes to a database file that was deleted, and reads of one overwritten."""
    caplog.set_level(logging.INFO)
    run = run_of_model(project["model"], MlflowConfig(tracking_uri=project["uri"]), EVALUATION)
    assert run.run_id == project["run_id"]
    if damage == "removed":
        project["db"].unlink()
    else:
        project["db"].write_bytes(b"not a database" * 1000)
    artifact = project["root"] / "eval.json"
    artifact.write_text("{}")

    run.log_metrics({"eval/val_loss": 1.5, "eval/val_bpb": 2.0})
    run.log_artifact(artifact, "eval")
    run.finish()

    [report] = [r.getMessage() for r in caplog.records if "could not be logged" in r.getMessage()]
    assert f"2 metric values and 1 artifacts of run {run.run_id} could not be logged" in report
    assert not [r for r in mlflow_records if r.levelno >= logging.WARNING or r.exc_info], \
        "MLflow's own traceback of the database error is not printed on top of our line"


@pytest.mark.parametrize("store", ["corrupt", "unreachable"])
def test_a_run_that_cannot_be_looked_up_gives_an_untracked_stage(project, caplog, mlflow_records, store):
    caplog.set_level(logging.INFO)
    if store == "corrupt":
        project["db"].write_bytes(b"not a database" * 1000)
        uri = project["uri"]
    else:
        uri = "http://127.0.0.1:9"  # nothing listens on the discard port
    run = run_of_model(project["model"], MlflowConfig(tracking_uri=uri), EVALUATION)

    assert isinstance(run, UntrackedRun) and run.run_id is None
    run.log_metrics({"eval/val_loss": 1.5})
    run.finish()
    messages = [r.getMessage() for r in caplog.records]
    assert any("not reachable" in m and "the evaluation is not logged to MLflow" in m for m in messages)
    assert "the evaluation was not tracked (1 metric values, 0 artifacts not logged)" in messages[-1]
    assert not [r for r in mlflow_records if r.levelno >= logging.WARNING or r.exc_info]


@pytest.fixture
def quick_tracker(monkeypatch):
    """The stage waits a second, not TRACKER_WAIT_S or FINISH_WAIT_S, for a tracker that does not answer (MLflow
    itself waits 20 s per call on a locked SQLite database): what is tested is that the wait is bounded, not its
    length."""
    import llm.tracking

    for wait in ("TRACKER_WAIT_S", "FINISH_WAIT_S"):
        monkeypatch.setattr(llm.tracking, wait, 1.0)


@contextlib.contextmanager
def locked(db: Path):
    """An exclusive lock on the SQLite database, held by another connection (as another process's would be)."""
    connection = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        connection.rollback()
        connection.close()


def mlflow_noise(output: str) -> list[str]:
    """MLflow's own warnings, errors and tracebacks in a stage's output."""
    return [line for line in output.splitlines()
            if "Traceback" in line or re.search(r"\b(WARNING|ERROR|CRITICAL) (mlflow|alembic|sqlalchemy)", line)]


def same_outputs(a: tuple[Path, Path], b: tuple[Path, Path]) -> None:
    (metrics_a, reports_a), (metrics_b, reports_b) = a, b
    assert metrics_a.read_bytes() == metrics_b.read_bytes()
    files = sorted(p.relative_to(reports_a) for p in reports_a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(reports_b) for p in reports_b.rglob("*") if p.is_file())
    for name in files:
        assert (reports_a / name).read_bytes() == (reports_b / name).read_bytes(), name


@pytest.mark.parametrize("when", ["from the start", "after the run was found"])
def test_a_locked_database_neither_stops_nor_stalls_evaluate_nor_changes_its_outputs(project, monkeypatch,
                                                                                    quick_tracker, when):
    """A lock held by another process (a `dvc exp run` beside this one, the MLflow UI writing) for as long as the
    stage runs: the stage waits for the tracker once, at most TRACKER_WAIT_S (to find its run) or FINISH_WAIT_S (at
    its end), writes the outputs an untracked evaluation writes, and says in one warning and one line at the end
    what was not logged."""
    import llm.evaluate

    untracked = write_params(project["root"] / "untracked.yaml",
                             evaluate={"prompts": ["But soft"], "max_new_tokens": 4},
                             mlflow={"tracking_uri": "http://127.0.0.1:9", "experiment": "eval"})
    baseline, *expected = evaluate({**project, "params": untracked}, "untracked")
    assert baseline.exit_code == 0, baseline.output

    lock = locked(project["db"])
    if when == "from the start":
        lock.__enter__()
    else:
        def found_then_locked(*args):
            run = run_of_model(*args)
            assert run.run_id == project["run_id"]
            lock.__enter__()
            return run

        monkeypatch.setattr(llm.evaluate, "run_of_model", found_then_locked)
    try:
        start = time.monotonic()
        result, *outputs = evaluate(project, "locked")
        elapsed = time.monotonic() - start
    finally:
        lock.__exit__(None, None, None)

    assert result.exit_code == 0, result.output
    assert elapsed < 10, "not MLflow's 20 s per call on a locked database"
    same_outputs(outputs, expected)
    lines = result.stderr.strip().splitlines()
    *warnings, report = [line for line in lines if "MLflow" in line]
    assert report == lines[-1], "reported at the end"
    if when == "from the start":
        [warning] = warnings
        assert "not reachable (no answer in 1 s)" in warning and "the evaluation is not logged to MLflow" in warning
        assert "the evaluation was not tracked (5 metric values, 4 artifacts not logged)" in report
    else:  # the tracker never answered: the one line is the report
        assert not warnings
        assert f"5 metric values and 4 artifacts of run {project['run_id']} could not be logged" in report
        assert "(no answer in 1 s)" in report
    assert not mlflow_noise(result.output)


def test_a_corrupt_database_neither_stops_evaluate_nor_changes_its_outputs(project, mlflow_records):
    tracked, *expected = evaluate(project, "tracked")
    assert tracked.exit_code == 0, tracked.output
    project["db"].write_bytes(b"not a database" * 1000)

    result, *outputs = evaluate(project, "corrupt")

    assert result.exit_code == 0, result.output
    same_outputs(outputs, expected)
    lines = result.stderr.strip().splitlines()
    warning, report = [line for line in lines if "MLflow" in line]
    assert "not reachable ((sqlite3.DatabaseError) file is not a database)" in warning
    assert "the evaluation is not logged to MLflow" in warning
    assert "the evaluation was not tracked" in report and report == lines[-1]
    assert not mlflow_noise(result.output)
    assert not [r for r in mlflow_records if r.levelno >= logging.WARNING or r.exc_info]


class HangingTracker:
    """A client whose every call hangs until released: a server that accepts and never answers, a locked
    database."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def log_batch(self, run_id, metrics):
        self.calls += 1
        self.release.wait(30)

    log_artifact = log_artifacts = log_batch


def test_logging_never_waits_for_the_tracker_and_the_end_waits_a_bounded_time(quick_tracker, caplog, monkeypatch):
    """What the training loop calls (log_metrics) returns at once whatever the tracker does, so no tracker time
    is ever counted in tokens/s; the stage's end waits FINISH_WAIT_S, not longer; what a tracker
    that does not answer would be given past MAX_PENDING_METRICS is dropped, and counted."""
    import llm.tracking

    monkeypatch.setattr(llm.tracking, "MAX_PENDING_METRICS", 100)
    caplog.set_level(logging.INFO)
    import mlflow.entities  # noqa: F401  (imported, as a tracked stage has it, before the timing starts)

    tracker = HangingTracker()
    run = ExistingRun(TrackerThread(), tracker, "run-1", "http://tracker", EVALUATION)
    try:
        start = time.monotonic()
        for step in range(1000):
            run.log_metrics({"train_loss": 1.0}, step=step)
        logging_took = time.monotonic() - start
        start = time.monotonic()
        run.finish()
        finishing_took = time.monotonic() - start
    finally:
        tracker.release.set()

    assert logging_took < 0.5, "a thousand log rows, as fast as appending to a list"
    assert tracker.calls >= 1, "the tracker was asked"
    assert 1.0 <= finishing_took < 3.0
    assert len(run.backlog.metrics) <= 100
    [report] = [r.getMessage() for r in caplog.records if "could not be logged" in r.getMessage()]
    assert "1000 metric values and 0 artifacts of run run-1 could not be logged (no answer in 1 s)" in report
