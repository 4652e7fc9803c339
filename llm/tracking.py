"""MLflow: one run per training, which evaluation and the guide later add to; the runs of an experiment, listed. Only
this module imports mlflow.

A failing tracker never stops a stage nor changes its outputs. Every stage logs through a TrackedRun, which keeps what
the tracker did not take, retries it, and at the end says in one line what could not be logged."""

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from llm.configs.mlflow import MlflowConfig
from llm.errors import InputError, first_line
from llm.project import git_commit, project_root

log = logging.getLogger(__name__)

# In a trained model's folder: which run trained it, so evaluation adds to that run.
MODEL_RUN_FILE = "mlflow_run.json"


@dataclasses.dataclass(frozen=True)
class Job:
    """The stage that logs to a run, as the tracker's messages name it."""

    name: str  # "training", "evaluation", "guide"
    outputs: str  # what it writes whether or not MLflow takes it: "metrics/eval.json, reports"


TRAINING = Job("training", "models/final, metrics/train.json, plots/train.csv")


class TrackedRun(Protocol):
    """What a stage logs to: the run a training opens (MlflowRun), the training's run that evaluation and the guide
    add to (ExistingRun), or a stand-in when there is no run to log to (UntrackedRun). No method raises when the
    tracker fails."""

    @property
    def run_id(self) -> str | None:
        """The MLflow run; None when nothing is logged."""

    @property
    def uri(self) -> str:
        """The tracking URI, made absolute (resolve_tracking_uri)."""

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder as a whole."""

    def finish(self, status: str = "FINISHED") -> None:
        """A last try at what the tracker has not taken yet, then one line saying what could not be logged."""


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """A relative sqlite path (sqlite:///mlflow.db) becomes absolute under `root`, so runs started from
    DVC's temporary experiment folders log to the project's one database."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(root) / uri.removeprefix(prefix)).resolve())
    if "://" not in uri:  # a plain folder path, as mlflow accepts
        return str((Path(root) / uri).resolve())
    return uri


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING


def _import_mlflow():
    # Fail fast rather than retry for minutes against an unreachable server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    # MLflow's SQL store logs a database error (locked, read-only, missing tables) with its whole traceback and
    # then raises it; the raised error reaches us and is reported in one line, so the traceback would only
    # flood the terminal.
    store_log = logging.getLogger("mlflow.store.db.utils")
    if _below_warning not in store_log.filters:
        store_log.addFilter(_below_warning)
    return mlflow


def metric_batch(metrics: dict[str, float], step: int) -> list:
    """mlflow Metric entities for one step, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in metrics.items()]


def send_artifact(client: Any, run_id: str, path: Path, artifact_path: str | None) -> None:
    """Log a file or a whole folder to the run."""
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


class Backlog:
    """What a stage sends to its MLflow run, kept until the tracker takes it: a tracking server (or database) that
    fails mid-stage never stops the stage. Failed sends are retried with a growing pause (so a dead server costs a
    log row no time); whatever is still not logged at the end is reported in one line."""

    def __init__(self, client: Any, run_id: str, uri: str, job: Job) -> None:
        self.client, self.run_id, self.uri, self.job = client, run_id, uri, job
        self.metrics: list[Any] = []  # mlflow Metric objects, with the time they were measured
        self.artifacts: list[tuple[Path, str | None]] = []
        self.end_status: str | None = None  # set when ending the run failed
        self.failures, self.retry_at, self.last_error = 0, 0.0, ""

    @property
    def pending(self) -> bool:
        return bool(self.metrics or self.artifacts or self.end_status)

    def add_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics += metric_batch(metrics, step)

    def add_artifact(self, path: Path, artifact_path: str | None) -> None:
        self.artifacts.append((path, artifact_path))

    def flush(self, force: bool = False) -> None:
        if not force and time.monotonic() < self.retry_at:
            return
        try:
            while self.metrics:
                self.client.log_batch(self.run_id, metrics=self.metrics[:1000])
                del self.metrics[:1000]
            while self.artifacts:
                send_artifact(self.client, self.run_id, *self.artifacts[0])
                self.artifacts.pop(0)
        except Exception as err:  # connection refused, timeouts, server errors, a locked database: all mean "later"
            self.note_failure(err)
            return
        if self.failures:
            log.info("MLflow at %s answers again: the backlog is logged", self.uri)
            self.failures = 0

    def note_failure(self, err: Exception) -> None:
        self.last_error = first_line(err)
        if not self.failures:
            log.warning("MLflow at %s failed (%s): the %s goes on; what is not logged is kept and retried",
                        self.uri, self.last_error, self.job.name)
        self.failures += 1
        self.retry_at = time.monotonic() + min(60.0, 2.0 ** self.failures)

    def report(self, status: str) -> None:
        if self.pending:
            end = f", nor its end ({self.end_status})" if self.end_status else ""
            outputs = f"; the outputs ({self.job.outputs}) are complete" if status == "FINISHED" else ""
            log.error("MLflow at %s: %d metric values and %d artifacts of run %s could not be logged%s (%s)%s",
                      self.uri, len(self.metrics), len(self.artifacts), self.run_id, end, self.last_error, outputs)


class ExistingRun:
    """Adds metrics and artifacts to a run that exists (the training's, for evaluation and the guide), leaving its
    status and end time alone; through a Backlog, so a tracker that fails after the run was found never stops the
    stage: what it did not take is reported by `finish`."""

    def __init__(self, client: Any, run_id: str, uri: str, job: Job) -> None:
        self.run_id, self.uri, self.job = run_id, uri, job
        self.backlog = Backlog(client, run_id, uri, job)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.backlog.add_metrics(metrics, step)
        self.backlog.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.backlog.add_artifact(Path(path), artifact_path)
        self.backlog.flush()

    def finish(self, status: str = "FINISHED") -> None:
        """One last try at the backlog, then a report of anything not logged."""
        self.backlog.flush(force=True)
        if self.backlog.pending:
            self.backlog.report(status)
        else:
            log.info("logged the %s to MLflow run %s at %s", self.job.name, self.run_id, self.uri)


class MlflowRun(ExistingRun):
    """The run of a training: opened at construction (raising whatever MLflow raises when the server cannot be
    used: the caller, start_training_run, then trains untracked), logged to as an ExistingRun, ended by `finish`.

    With `resume_run_id` (a training resumed from a checkpoint), the run that training started is reopened
    if the server still has it, so an interrupted and resumed training stays one run."""

    def __init__(self, cfg: MlflowConfig, root: Path, params: dict[str, Any], tags: dict[str, str],
                 run_name: str | None = None, resume_run_id: str | None = None) -> None:
        self.mlflow = mlflow = _import_mlflow()
        self.uri = resolve_tracking_uri(cfg.tracking_uri, root)
        mlflow.set_tracking_uri(self.uri)
        if self.uri.startswith("sqlite:") and mlflow.get_experiment_by_name(cfg.experiment) is None:
            # Artifacts beside the database, not in the working directory of the first run (which may be a
            # temporary DVC experiment folder).
            mlflow.create_experiment(cfg.experiment, artifact_location=(Path(root) / "mlruns").resolve().as_uri())
        mlflow.set_experiment(cfg.experiment)
        params = {k: str(v)[:6000] for k, v in flatten(params).items()}
        previous = self._find_run(resume_run_id) if resume_run_id else None
        if previous is None:
            self.run = mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=True)
            mlflow.log_params(params)
        else:
            self.run = mlflow.start_run(run_id=resume_run_id, tags=tags, log_system_metrics=True)
            # A param cannot change value in MLflow; those the resumed run may change (logging, compile,
            # process count) are recorded as tags instead.
            logged = previous.data.params
            mlflow.log_params({k: v for k, v in params.items() if k not in logged})
            mlflow.set_tags({f"resumed.{k}": v for k, v in params.items() if k in logged and logged[k] != v})
        self.resumed = previous is not None
        super().__init__(mlflow.MlflowClient(self.uri), self.run.info.run_id, self.uri, TRAINING)

    def _find_run(self, run_id: str):
        try:
            return self.mlflow.MlflowClient(self.uri).get_run(run_id)
        except Exception:  # deleted, or another database: start a new run
            log.warning("MLflow run %s of the checkpoint is not at %s: starting a new run", run_id, self.uri)
            return None

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`: one last try at the backlog, then a report of anything not logged."""
        self.backlog.flush(force=True)
        try:
            self.mlflow.end_run(status=status)
        except Exception as err:
            self.backlog.note_failure(err)
            self.backlog.end_status = status
        self.backlog.report(status)


class UntrackedRun:
    """Stands in for the MLflow run when there is none to log to: the tracker was not usable as training started,
    or the run of the model that evaluation and the guide add to cannot be found. A failing tracker never stops a
    stage, so it goes on untracked and its end says so."""

    run_id = None
    resumed = False

    def __init__(self, uri: str, reason: str, job: Job = TRAINING) -> None:
        self.uri, self.reason, self.job = uri, reason, job
        self.metrics = self.artifacts = 0

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.metrics += len(metrics)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts += 1

    def finish(self, status: str = "FINISHED") -> None:
        log.error("%s: the %s was not tracked (%d metric values, %d artifacts not logged)%s", self.reason,
                  self.job.name, self.metrics, self.artifacts,
                  f"; the outputs ({self.job.outputs}) are complete" if status == "FINISHED" else "")


def start_training_run(cfg: MlflowConfig, params: dict[str, Any], device: str, world_size: int,
                       resume_run_id: str | None = None) -> MlflowRun | UntrackedRun:
    """The MLflow run of a training: every param, the git commit, the device; named after the DVC experiment
    when `dvc exp run` started it. With `resume_run_id` the run of an interrupted training is reopened. A
    tracking server that cannot be used gives an UntrackedRun, with a warning: training goes on."""
    root = project_root()
    tags = {"git_commit": git_commit(root), "device": device, "world_size": str(world_size)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    try:
        run = MlflowRun(cfg, root, {**params, "git_commit": tags["git_commit"]}, tags,
                        run_name=os.environ.get("DVC_EXP_NAME"), resume_run_id=resume_run_id)
    except Exception as err:  # a refused connection, a bad database, an unknown scheme: all "not usable"
        uri = resolve_tracking_uri(cfg.tracking_uri, root)
        log.warning("MLflow at %s is not usable (%s): training goes on without tracking", uri, first_line(err))
        return UntrackedRun(uri, f"MLflow at {uri} was not usable when training started ({first_line(err)})")
    log.info("MLflow run %s in experiment %r at %s%s", run.run_id, cfg.experiment, run.uri,
             " (reopened: training resumes from a checkpoint)" if run.resumed else "")
    return run


@dataclasses.dataclass(frozen=True)
class RunSummary:
    name: str | None
    run_id: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    params: dict[str, str]
    metrics: dict[str, float]  # the last value of each


def newest_runs(tracking_uri: str, experiment: str, limit: int) -> list[RunSummary]:
    """The `limit` most recently started runs of an experiment (none if it does not exist); raises when the
    tracking server cannot be used."""
    client = _import_mlflow().MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"])
    return [RunSummary(r.info.run_name, r.info.run_id, r.info.status, dict(r.data.params), dict(r.data.metrics))
            for r in runs]


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """MODEL_RUN_FILE in a trained model's folder: the run that trained the model, and where it was logged."""

    run_id: str | None  # None: the training was not tracked
    tracking_uri: str | None


def model_run_record(run: TrackedRun) -> dict[str, str | None]:
    """What MODEL_RUN_FILE holds for a training that logged to `run`."""
    return dataclasses.asdict(ModelRun(run.run_id, run.uri))


def read_model_run(model_dir: Path) -> ModelRun | None:
    """The model folder's MODEL_RUN_FILE; None when it has none (a model from elsewhere)."""
    path = Path(model_dir) / MODEL_RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        run_id, uri = record["run_id"], record.get("tracking_uri")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError) as err:
        raise InputError(f"{path}: unreadable ({err})") from None
    return ModelRun(None if run_id is None else str(run_id), None if uri is None else str(uri))


def run_of_model(model_dir: Path, cfg: MlflowConfig, job: Job) -> TrackedRun:
    """The MLflow run that trained the model in `model_dir`, for `job` to add to; looked up at params' tracking URI
    only (a model folder from elsewhere never makes us contact the server it names). An UntrackedRun, with a
    warning, when the folder names no run or the run cannot be reached (not there, a server down, a locked or
    corrupt database): the stage writes its outputs all the same, and its end says what was not logged."""
    path = Path(model_dir) / MODEL_RUN_FILE
    uri = resolve_tracking_uri(cfg.tracking_uri, project_root())
    trained = read_model_run(model_dir)
    if trained is None:
        return _untracked(uri, f"{path} not found", job)
    if trained.run_id is None:
        return _untracked(uri, f"{path}: the training was not tracked", job)
    if trained.tracking_uri != uri:
        log.warning("%s names a run at %s; the %s logs to mlflow.tracking_uri (%s) only", path,
                    trained.tracking_uri, job.name, uri)
    try:
        client = _import_mlflow().MlflowClient(uri)
        client.get_run(trained.run_id)
    except Exception as err:  # connection errors, a missing run, a bad database: all mean "cannot log there"
        return _untracked(uri, f"MLflow run {trained.run_id} at {uri}: not reachable ({first_line(err)})", job)
    return ExistingRun(client, trained.run_id, uri, job)


def _untracked(uri: str, reason: str, job: Job) -> UntrackedRun:
    log.warning("%s: the %s is not logged to MLflow", reason, job.name)
    return UntrackedRun(uri, reason, job)
