"""MLflow: one run per training, which evaluation and the guide later add to; the runs of an experiment, listed. Only
this module imports mlflow."""

import dataclasses
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from llm.configs.mlflow import MlflowConfig
from llm.errors import InputError

log = logging.getLogger(__name__)

# In a trained model's folder: which run trained it, so evaluation adds to that run.
MODEL_RUN_FILE = "mlflow_run.json"


def project_root() -> Path:
    """The outermost folder above the working directory that holds .dvc/: the repository, also when DVC
    runs an experiment in a temporary copy inside it."""
    here = Path.cwd().resolve()
    roots = [p for p in (here, *here.parents) if (p / ".dvc").is_dir()]
    return roots[-1] if roots else here


def git_commit(root: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


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


def _import_mlflow():
    # Fail fast rather than retry for minutes against an unreachable server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    return mlflow


def first_line(err: BaseException) -> str:
    """What an MLflow error says, in one line (they can run to pages of server response)."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


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


class MlflowRun:
    """Opens the run at construction (raising whatever MLflow raises when the server cannot be used: the caller,
    start_training_run, then trains untracked); log_* afterwards, through a Backlog that never raises.

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
        self.run_id = self.run.info.run_id
        self.resumed = previous is not None
        self.backlog = Backlog(mlflow.MlflowClient(self.uri), self.run_id, self.uri)

    def _find_run(self, run_id: str):
        try:
            return self.mlflow.MlflowClient(self.uri).get_run(run_id)
        except Exception:  # deleted, or another database: start a new run
            log.warning("MLflow run %s of the checkpoint is not at %s: starting a new run", run_id, self.uri)
            return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.backlog.add_metrics(metrics, step)
        self.backlog.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.backlog.add_artifact(Path(path), artifact_path)
        self.backlog.flush()

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`: one last try at the backlog, then a report of anything not logged."""
        self.backlog.flush(force=True)
        try:
            self.mlflow.end_run(status=status)
        except Exception as err:
            self.backlog.note_failure(err)
            self.backlog.end_status = status
        self.backlog.report(status)


class Backlog:
    """What a training sends to its MLflow run, kept until the server takes it: a tracking server that fails
    mid-run never stops training. Failed sends are retried with a growing pause (so a dead server costs a
    log row no time); whatever is still not logged at the end is reported in one line."""

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri
        self.metrics: list[Any] = []  # mlflow Metric objects, with the time they were measured
        self.artifacts: list[tuple[Path, str | None]] = []
        self.end_status: str | None = None  # set when ending the run failed
        self.failures, self.retry_at, self.last_error = 0, 0.0, ""

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
        except Exception as err:  # connection refused, timeouts, server errors: all mean "later"
            self.note_failure(err)
            return
        if self.failures:
            log.info("MLflow at %s answers again: the backlog is logged", self.uri)
            self.failures = 0

    def note_failure(self, err: Exception) -> None:
        self.last_error = first_line(err)
        if not self.failures:
            log.warning("MLflow at %s failed (%s): training goes on; what is not logged is kept and retried",
                        self.uri, self.last_error)
        self.failures += 1
        self.retry_at = time.monotonic() + min(60.0, 2.0 ** self.failures)

    def report(self, status: str) -> None:
        if self.metrics or self.artifacts or self.end_status:
            end = f", nor its end ({self.end_status})" if self.end_status else ""
            outputs = "; the outputs (models/final, metrics/train.json, plots/train.csv) are complete" \
                if status == "FINISHED" else ""
            log.error("MLflow at %s: %d metric values and %d artifacts of run %s could not be logged%s (%s)%s",
                      self.uri, len(self.metrics), len(self.artifacts), self.run_id, end, self.last_error, outputs)


class ExistingRun:
    """Adds metrics and artifacts to a run that already exists (the training's), leaving its status and end
    time alone. Checks at construction that the run can be reached."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = _import_mlflow().MlflowClient(tracking_uri)
        self.run_id, self.uri = run_id, tracking_uri
        try:
            self.client.get_run(run_id)
        except Exception as err:  # connection errors, missing run, bad database: all mean "cannot log there"
            raise InputError(f"MLflow run {run_id} at {tracking_uri}: not reachable ({first_line(err)})") from None

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.client.log_batch(self.run_id, metrics=metric_batch(metrics, step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        send_artifact(self.client, self.run_id, Path(path), artifact_path)


class UntrackedRun:
    """Stands in for the MLflow run when the tracking server cannot be used as training starts: a failing
    tracker never stops training, so it goes on untracked and its end says so."""

    run_id = None
    resumed = False

    def __init__(self, uri: str, error: str) -> None:
        self.uri, self.error = uri, error
        self.metrics = self.artifacts = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics += len(metrics)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts += 1

    def finish(self, status: str = "FINISHED") -> None:
        log.error("MLflow at %s was not usable when training started (%s): this training was not tracked "
                  "(%d metric values, %d artifacts not logged)%s", self.uri, self.error, self.metrics,
                  self.artifacts, "; the outputs are complete" if status == "FINISHED" else "")


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
        return UntrackedRun(uri, first_line(err))
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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"])
    return [RunSummary(r.info.run_name, r.info.run_id, r.info.status, dict(r.data.params), dict(r.data.metrics))
            for r in runs]


def model_run_record(run: MlflowRun | UntrackedRun) -> dict[str, str | None]:
    """What MODEL_RUN_FILE holds."""
    return {"run_id": run.run_id, "tracking_uri": run.uri}


def run_of_model(model_dir: Path, cfg: MlflowConfig) -> ExistingRun | None:
    """The MLflow run that trained the model in `model_dir`, looked up at params' tracking URI only (a model
    folder from elsewhere never makes us contact the server it names). None, with a warning, when the folder
    names no run or the run is not there: evaluation then writes its outputs without logging them."""
    path = Path(model_dir) / MODEL_RUN_FILE
    if not path.is_file():
        log.warning("%s not found: evaluation is not logged to MLflow", path)
        return None
    try:
        record = json.loads(path.read_text())
        run_id, named_uri = record["run_id"], record.get("tracking_uri")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError) as err:
        raise InputError(f"{path}: unreadable ({err})") from None
    if run_id is None:
        log.warning("%s: the training was not tracked; evaluation is not logged to MLflow either", path)
        return None
    uri = resolve_tracking_uri(cfg.tracking_uri, project_root())
    if named_uri != uri:
        log.warning("%s names a run at %s; evaluation logs to mlflow.tracking_uri (%s) only", path, named_uri, uri)
    try:
        return ExistingRun(uri, str(run_id))
    except InputError as err:
        log.warning("%s: evaluation is not logged to MLflow", err)
        return None
