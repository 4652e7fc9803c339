"""MLflow: one run per training, which evaluation and the guide later add to; the runs of an experiment, listed. Only
this module imports mlflow, and, on the TrackerThread its runs hand them to, llm/model_registry.py (the models: logged,
linked to their evaluation, registered, downloaded) and the model code MLflow itself loads (llm/mlflow_model.py,
llm/mlflow_chat_model.py).

No state of the tracker (down, locked, corrupt, slow) stops a stage, stalls it for long or changes its outputs. Every
stage logs through a TrackedRun, which keeps what the tracker did not take, retries it, and at the end says in one line
what could not be logged; every MLflow call runs on a TrackerThread, which a stage waits for only to find or open its
run (at most TRACKER_WAIT_S) and at its end (at most FINISH_WAIT_S, longer only while an artifact uploads)."""

import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llm.configs.mlflow import MlflowConfig
from llm.errors import InputError, first_line
from llm.lineage import InputDataset, Lineage, RunCard, flatten
from llm.project import git_commit, project_root

log = logging.getLogger(__name__)

# In a trained model's folder: which run trained it, so evaluation adds to that run.
MODEL_RUN_FILE = "mlflow_run.json"

# The longest a stage waits for the tracker, in all, when it looks up or opens its run; and at its end, when it hands
# over what is left (a last batch of metrics, the run's end: a few statements). MLflow's own waits add up to more
# (20 s per call on a locked SQLite database), and a server may never answer; every MLflow call runs on a
# TrackerThread, so no other wait reaches a stage. 30 s to open: a new SQLite database's migrations (the first run
# of a project) took over 10 s on a busy 2-core machine.
TRACKER_WAIT_S = 30.0
FINISH_WAIT_S = 10.0
# An artifact upload may take longer: a large model to a remote server. A server that stops answering during one
# is cut sooner, by MLflow's HTTP timeout (TRACKER_WAIT_S without a byte).
UPLOAD_WAIT_S = 600.0
# How often a training samples the machine's state (CPU, memory, disk, network; GPUs where nvidia-ml-py finds them):
# 60 points over the default 5-minute run, 720 an hour; a run shorter than this still gets one point, at its end.
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL_S = 5.0
# What a stage keeps for a tracker that does not take it: beyond this, metric values are dropped (and counted).
MAX_PENDING_METRICS = 100_000

T = TypeVar("T")


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

    def call(self, what: str, task: Callable[[Any, str], None], upload: bool = False) -> None:
        """task(client, run_id) on the tracker thread, after what was logged before it, as a record is: retried
        when it fails, reported by `finish` when it never succeeds (`what` names it there). It must be safe to
        retry. `upload`: it uploads files (a model), and is waited for as an artifact is. With no run, `finish`
        reports it as not logged."""

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


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING


def _import_mlflow():
    # Fail fast rather than retry for minutes against an unreachable server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(TRACKER_WAIT_S)))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per logged model on the terminal
    import mlflow

    # MLflow logs a tracker's failure itself, often with its whole traceback (the SQL store before it raises a
    # database error, the system metrics thread, the engine's retries on a corrupt database), and then raises it
    # or goes on: every failure that matters to a stage reaches us and is reported in one line, so its warnings
    # and errors would only flood the terminal. Its INFO lines stay. The filter sits on the SQL store's logger
    # (its records never reach any handler) and on the handler MLflow gives its loggers (the terminal).
    store_log = logging.getLogger("mlflow.store.db.utils")
    if _below_warning not in store_log.filters:
        store_log.addFilter(_below_warning)
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    for handler in logging.getLogger("mlflow").handlers:
        mlflows = getattr(handler, "stream", None) is MLFLOW_LOGGING_STREAM  # not a handler someone else put there
        if mlflows and _below_warning not in handler.filters:
            handler.addFilter(_below_warning)
    return mlflow


class TrackerThread:
    """The one thread on which a stage talks to MLflow. A daemon, so a tracker that never answers never keeps the
    process; the stage hands it calls and waits for them at most TRACKER_WAIT_S in all (`call`, `wait`: longer
    only while an artifact uploads), or not at all (`submit`). MLflow's run-local state (the active run, its system
    metrics monitor) lives on this thread."""

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.upload_due = 0.0  # while an artifact uploads: when the stage stops waiting for it
        self.thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            task()

    @contextlib.contextmanager
    def upload(self) -> Iterator[None]:
        """Around an artifact upload, which may take longer than TRACKER_WAIT_S: a large model to a remote server.
        Once it is over, the tracker has answered: what comes next (another upload, a model, the run's end) has
        FINISH_WAIT_S of its own, so a stage's end that uploads several models is not cut between two of them."""
        self.upload_due = time.monotonic() + UPLOAD_WAIT_S
        try:
            yield
        finally:
            self.upload_due = time.monotonic() + FINISH_WAIT_S

    def submit(self, task: Callable[[], None]) -> threading.Event:
        """Run `task` (which must not raise) on the thread; the event is set once it has run."""
        done = threading.Event()

        def run() -> None:
            try:
                task()
            finally:
                done.set()

        self.tasks.put(run)
        return done

    def call(self, fn: Callable[[], T]) -> T:
        """fn's result, computed on the thread; what it raises; or TimeoutError when the tracker has not answered
        within TRACKER_WAIT_S (fn goes on running, and its result is dropped)."""
        box: dict[str, Any] = {}

        def task() -> None:
            try:
                box["value"] = fn()
            except Exception as err:
                box["error"] = err

        if not self.wait(self.submit(task)):
            raise TimeoutError(f"no answer in {TRACKER_WAIT_S:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def wait(self, done: threading.Event, seconds: float | None = None) -> bool:
        """Wait for `done`, at most `seconds` (TRACKER_WAIT_S), longer only while an artifact uploads: False when it
        is not done. A bound on the whole wait, not on each answer: a locked SQLite database answers each call
        with an error after MLflow's 20 s, and the calls of a stage's end would add up."""
        deadline = time.monotonic() + (TRACKER_WAIT_S if seconds is None else seconds)
        while not done.wait(0.05):
            if time.monotonic() > max(deadline, self.upload_due):
                return False
        return True

    def close(self) -> None:
        """The thread ends after the tasks it holds (a daemon still, should one of them never return)."""
        self.tasks.put(None)


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
    """What a stage sends to its MLflow run, kept until the tracker takes it and sent on the stage's TrackerThread:
    adding to it never waits on the tracker, so a tracking server (or database) that is down, locked, corrupt or
    slow costs the stage no time and changes none of its outputs. Failed sends are retried, with a growing pause,
    when more arrives; `close` makes a last try, waits for the tracker only while it answers, and reports in one
    line whatever is still not logged."""

    def __init__(self, thread: TrackerThread, client: Any, run_id: str, uri: str, job: Job) -> None:
        self.thread, self.client, self.run_id, self.uri, self.job = thread, client, run_id, uri, job
        self.lock = threading.Lock()  # the stage adds, the thread sends
        self.metrics: list[Any] = []  # mlflow Metric objects, with the time they were measured
        self.artifacts: list[tuple[Path, str | None]] = []
        self.calls: list[tuple[str, Callable[[Any, str], None], bool]] = []  # (what, task, upload): a model, ...
        self.dropped = 0  # metric values beyond MAX_PENDING_METRICS, never sent
        self.end_status: str | None = None  # the status the run is to end with, until the tracker took it
        self.failures, self.retry_at, self.last_error = 0, 0.0, ""
        self.send_queued = False
        self.abandoned = False  # the stage stopped waiting: the thread sends nothing more and says nothing more

    @property
    def pending(self) -> bool:
        with self.lock:
            return bool(self.metrics or self.artifacts or self.calls or self.end_status or self.dropped)

    def add_metrics(self, metrics: dict[str, float], step: int) -> None:
        batch = metric_batch(metrics, step)
        with self.lock:
            kept = batch[:max(0, MAX_PENDING_METRICS - len(self.metrics))]
            self.metrics += kept
            self.dropped += len(batch) - len(kept)
        self._send_soon()

    def add_artifact(self, path: Path, artifact_path: str | None) -> None:
        with self.lock:
            self.artifacts.append((path, artifact_path))
        self._send_soon()

    def add_call(self, what: str, task: Callable[[Any, str], None], upload: bool) -> None:
        with self.lock:
            self.calls.append((what, task, upload))
        self._send_soon()

    def _send_soon(self) -> None:
        with self.lock:
            if self.send_queued:
                return
            self.send_queued = True
        self.thread.submit(self._send)

    def _send(self) -> None:
        with self.lock:
            self.send_queued = False
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """On the thread: send what is pending, unless a failure's pause is not over (`force`: regardless).
        True when everything was taken."""
        if not force and time.monotonic() < self.retry_at:
            return False
        try:
            while batch := self._next(lambda: self.metrics[:1000]):
                self.client.log_batch(self.run_id, metrics=batch)
                with self.lock:
                    del self.metrics[:len(batch)]
            while artifact := self._next(lambda: self.artifacts[0] if self.artifacts else None):
                with self.thread.upload():
                    send_artifact(self.client, self.run_id, *artifact)
                with self.lock:
                    self.artifacts.pop(0)
            while call := self._next(lambda: self.calls[0] if self.calls else None):
                _, task, upload = call
                with self.thread.upload() if upload else contextlib.nullcontext():
                    task(self.client, self.run_id)
                with self.lock:
                    self.calls.pop(0)
        except Exception as err:  # connection refused, timeouts, server errors, a locked database: all mean "later"
            self.note_failure(err)
            return False
        if self.abandoned:
            return False
        if self.failures:
            log.info("MLflow at %s answers again: the backlog is logged", self.uri)
            self.failures = 0
        return True

    def _next(self, take: Callable[[], Any]) -> Any:
        with self.lock:
            return None if self.abandoned else take()

    def note_failure(self, err: Exception) -> None:
        if self.abandoned:
            return
        self.last_error = first_line(err)
        if not self.failures:
            log.warning("MLflow at %s failed (%s): the %s goes on; what is not logged is kept and retried",
                        self.uri, self.last_error, self.job.name)
        self.failures += 1
        self.retry_at = time.monotonic() + min(60.0, 2.0 ** self.failures)

    def close(self, status: str, end: Callable[[str], None] | None = None) -> bool:
        """From the stage: a last try at what is pending and at ending the run with `status` (`end`), on the thread;
        waited for at most FINISH_WAIT_S (TrackerThread.wait). Then one line for whatever was not logged. True when
        everything was."""
        if end is not None:
            self.end_status = status

        def last_try() -> None:
            self.flush(force=True)
            if end is None or self.abandoned:  # the stage has said the run was not ended, and goes its way
                return
            try:
                end(status)
                self.end_status = None
            except Exception as err:
                self.note_failure(err)

        done = self.thread.submit(last_try)
        self.thread.close()
        if not self.thread.wait(done, FINISH_WAIT_S):
            with self.lock:
                self.abandoned = True
                self.last_error = self.last_error or f"no answer in {FINISH_WAIT_S:g} s"
        if not self.pending:
            return True
        self.report(status)
        return False

    def report(self, status: str) -> None:
        with self.lock:
            metrics, artifacts = len(self.metrics) + self.dropped, len(self.artifacts)
            calls = "".join(f", nor {what}" for what, *_ in self.calls)
        end = calls + (f", nor its end ({self.end_status})" if self.end_status else "")
        outputs = f"; the outputs ({self.job.outputs}) are complete" if status == "FINISHED" else ""
        log.error("MLflow at %s: %d metric values and %d artifacts of run %s could not be logged%s (%s)%s",
                  self.uri, metrics, artifacts, self.run_id, end, self.last_error, outputs)


class ExistingRun:
    """Adds metrics and artifacts to a run that exists (the training's, for evaluation and the guide), leaving its
    status and end time alone; through a Backlog, so a tracker that fails after the run was found never stops nor
    stalls the stage: what it did not take is reported by `finish`."""

    def __init__(self, thread: TrackerThread, client: Any, run_id: str, uri: str, job: Job) -> None:
        self.run_id, self.uri, self.job = run_id, uri, job
        self.backlog = Backlog(thread, client, run_id, uri, job)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.backlog.add_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.backlog.add_artifact(Path(path), artifact_path)

    def call(self, what: str, task: Callable[[Any, str], None], upload: bool = False) -> None:
        self.backlog.add_call(what, task, upload)

    def finish(self, status: str = "FINISHED") -> None:
        """One last try at the backlog, then a report of anything not logged."""
        if self.backlog.close(status):
            log.info("logged the %s to MLflow run %s at %s", self.job.name, self.run_id, self.uri)


class MlflowRun(ExistingRun):
    """The run of a training: opened at construction on `thread` (raising whatever MLflow raises when the server
    cannot be used, or TimeoutError when it does not answer: the caller, start_training_run, then trains untracked),
    logged to as an ExistingRun, ended by `finish`.

    With `resume_run_id` (a training resumed from a checkpoint), the run that training started is reopened
    if the server still has it, so an interrupted and resumed training stays one run."""

    def __init__(self, thread: TrackerThread, cfg: MlflowConfig, root: Path, params: dict[str, Any],
                 tags: dict[str, str], run_name: str | None = None, resume_run_id: str | None = None,
                 datasets: Sequence[InputDataset] = ()) -> None:
        self.mlflow = _import_mlflow()  # here, not on the thread: importing is no wait for the tracker
        self.system_metrics: Any = None  # MLflow's SystemMetricsMonitor, once the run is open
        uri = resolve_tracking_uri(cfg.tracking_uri, root)
        params = {k: str(v)[:6000] for k, v in flatten(params).items()}
        client, run_id, self.resumed = _ask(thread, uri, lambda: self._open(uri, cfg, root, params, tags, run_name,
                                                                             resume_run_id))
        super().__init__(thread, client, run_id, uri, TRAINING)
        # After the open, which a stage waits for: as records the backlog retries, and a monitor of its own.
        if datasets:
            inputs = [dataset_input(d) for d in datasets]
            self.call("the input datasets", lambda client, run_id: client.log_inputs(run_id, datasets=inputs))
        thread.submit(self._start_system_metrics)

    def _open(self, uri: str, cfg: MlflowConfig, root: Path, params: dict[str, str], tags: dict[str, str],
              run_name: str | None, resume_run_id: str | None) -> tuple[Any, str, bool]:
        """On the thread (MLflow's active run is the thread's): (client, run id, whether the run was reopened)."""
        mlflow = self.mlflow
        mlflow.set_tracking_uri(uri)
        if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(cfg.experiment) is None:
            # Artifacts beside the database, not in the working directory of the first run (which may be a
            # temporary DVC experiment folder).
            mlflow.create_experiment(cfg.experiment, artifact_location=(Path(root) / "mlruns").resolve().as_uri())
        mlflow.set_experiment(cfg.experiment)
        client = mlflow.MlflowClient(uri)
        previous = self._find_run(client, uri, resume_run_id) if resume_run_id else None
        if previous is None:
            run = mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=False)
            mlflow.log_params(params)
        else:
            run = mlflow.start_run(run_id=resume_run_id, tags=tags, log_system_metrics=False)
            # A param cannot change value in MLflow; those the resumed run may change (logging, compile,
            # process count) are recorded as tags instead.
            logged = previous.data.params
            mlflow.log_params({k: v for k, v in params.items() if k not in logged})
            mlflow.set_tags({f"resumed.{k}": v for k, v in params.items() if k in logged and logged[k] != v})
        return client, run.info.run_id, previous is not None

    @staticmethod
    def _find_run(client: Any, uri: str, run_id: str):
        try:
            return client.get_run(run_id)
        except Exception:  # deleted, or another database: start a new run
            log.warning("MLflow run %s of the checkpoint is not at %s: starting a new run", run_id, uri)
            return None

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`: one last try at the backlog, then a report of anything not logged."""
        self.backlog.close(status, end=self._end)
        # A run the tracker did not end in time: its monitor stops sampling all the same, rather than ask the tracker
        # every interval for as long as the process lives (a test's, a notebook's). MLflow's monitor has no public
        # way to stop without waiting for its thread, which may be waiting on the tracker.
        stop = getattr(self.system_metrics, "_shutdown_event", None)
        if stop is not None:
            stop.set()

    def _start_system_metrics(self) -> None:
        """On the thread, after the open: a monitor that cannot start leaves the run without system/ metrics."""
        if self.backlog.abandoned:  # the stage has ended
            return
        try:
            self.system_metrics = start_system_metrics(self.run_id, self.uri, resumed=self.resumed)
        except Exception as err:
            log.info("MLflow: no system metrics for this run (%s)", first_line(err))

    def _end(self, status: str) -> None:
        """On the thread: the system metrics' last point, then the run's end."""
        stop_system_metrics(self.system_metrics)
        self.mlflow.end_run(status=status)


def dataset_input(dataset: InputDataset) -> Any:
    """An InputDataset as MLflow logs it: the dataset (a local source) and its context as an input tag."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entity = Dataset(dataset.name, dataset.digest, "local", json.dumps({"uri": dataset.source}),
                     profile=json.dumps(dataset.profile))
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", dataset.context)])


def start_system_metrics(run_id: str, uri: str, resumed: bool) -> Any:
    """MLflow's monitor of the machine (system/ metrics), sampling every SYSTEM_METRICS_INTERVAL_S on a daemon thread
    of its own, so it never holds a stage; with `resumed`, continuing the steps a reopened run logged."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        """MLflow's monitor with a loop that samples at the end of each interval and once more when it stops, so the
        last part of a run (all of one shorter than the interval) has its point too. Sampling stays on the monitor's
        thread: psutil measures CPU use since the calling thread's previous call (a first call says 0)."""

        def monitor(self) -> None:
            self.collect_metrics()  # the start of the first interval
            for part in self.monitors:
                part.clear_metrics()
            while True:
                stopping = self._shutdown_event.wait(self.sampling_interval)
                self.collect_metrics()
                try:
                    self.publish_metrics(self.aggregate_metrics())
                except Exception:  # a tracker failing: the run's own records report it; the machine's are let go
                    return
                if stopping:
                    return

    monitor = Monitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=resumed, tracking_uri=uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """On the tracker thread, before the run ends: the monitor's last point, and its thread stopped."""
    if monitor is not None:
        monitor.finish()


class UntrackedRun:
    """Stands in for the MLflow run when there is none to log to: the tracker was not usable as training started,
    or the run of the model that evaluation and the guide add to cannot be found. A failing tracker never stops a
    stage, so it goes on untracked and its end says so."""

    run_id = None
    resumed = False

    def __init__(self, uri: str, reason: str, job: Job = TRAINING) -> None:
        self.uri, self.reason, self.job = uri, reason, job
        self.metrics = self.artifacts = 0
        self.calls: list[str] = []

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.metrics += len(metrics)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts += 1

    def call(self, what: str, task: Callable[[Any, str], None], upload: bool = False) -> None:
        self.calls.append(what)

    def finish(self, status: str = "FINISHED") -> None:
        log.error("%s: the %s was not tracked (%d metric values, %d artifacts not logged)%s%s", self.reason,
                  self.job.name, self.metrics, self.artifacts, "".join(f", nor {what}" for what in self.calls),
                  f"; the outputs ({self.job.outputs}) are complete" if status == "FINISHED" else "")


def start_training_run(cfg: MlflowConfig, params: dict[str, Any], device: str, world_size: int,
                       resume_run_id: str | None = None, tags: dict[str, str] | None = None,
                       lineage: Lineage | None = None) -> MlflowRun | UntrackedRun:
    """The MLflow run of a training: every param, the git commit, the device and `tags`; with `lineage`, its input
    datasets, tags and name (llm/lineage.py), else named after the DVC experiment when `dvc exp run` started it. The
    machine's state is sampled as system/ metrics until the run ends. With `resume_run_id` the run of an interrupted
    training is reopened. A tracking server that cannot be used gives an UntrackedRun, with a warning: training goes
    on."""
    root = project_root()
    tags = {"git_commit": git_commit(root), "device": device, "world_size": str(world_size),
            **(lineage.tags if lineage else {}), **(tags or {})}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    _UNUSABLE.clear()
    thread = TrackerThread()
    try:
        run = MlflowRun(thread, cfg, root, {**params, "git_commit": tags["git_commit"]}, tags,
                        run_name=lineage.name if lineage else os.environ.get("DVC_EXP_NAME"),
                        resume_run_id=resume_run_id, datasets=lineage.datasets if lineage else ())
    except Exception as err:  # a refused connection, a bad database, an unknown scheme, no answer: "not usable"
        thread.submit(_end_late_run)
        thread.close()
        uri = resolve_tracking_uri(cfg.tracking_uri, root)
        log.warning("MLflow at %s is not usable (%s): training goes on without tracking", uri, first_line(err))
        return UntrackedRun(uri, f"MLflow at {uri} was not usable when training started ({first_line(err)})")
    log.info("MLflow run %s in experiment %r at %s%s", run.run_id, cfg.experiment, run.uri,
             " (reopened: training resumes from a checkpoint)" if run.resumed else "")
    return run


def log_run_card(run: TrackedRun, card: RunCard, train_seconds: float, stage: str = "train") -> None:
    """A training's run card (llm/lineage.py) as run_card.md, and the wall time of its `stage` as a tag beside the
    card's others."""

    def task(client: Any, run_id: str) -> None:
        client.set_tag(run_id, f"card.wall_seconds.{stage}", f"{train_seconds:.1f}")
        client.log_text(run_id, card.markdown(train_seconds, stage), "run_card.md")

    run.call("the run card", task)


def _end_late_run() -> None:
    """On the thread of a run that did not open in time: a run that opens after all is ended, not left running."""
    import mlflow

    try:
        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
    except Exception:  # the tracker that did not answer in time: nothing more to do for a run nobody logs to
        pass


class TrackerUnusable(Exception):
    """The tracker failed earlier in this stage (_ask)."""


# Tracking URIs whose store failed in this stage (no answer within TRACKER_WAIT_S, a locked or corrupt database, a
# server down), with why: its later look-ups give up at once, so a stage waits for a tracker that does not answer
# once, not once per look-up (the guide looks up the model's run, then lists the experiment's runs). A run that is
# not there is no failure of the store. A stage's first look-up (start_training_run, run_of_model) clears it.
_UNUSABLE: dict[str, str] = {}


def _ask(thread: TrackerThread, uri: str, fn: Callable[[], T]) -> T:
    """fn's result, asked of the tracker at `uri` on `thread` (TrackerThread.call)."""
    if uri in _UNUSABLE:
        raise TrackerUnusable(f"{_UNUSABLE[uri]}, earlier in this stage")
    try:
        return thread.call(fn)
    except Exception as err:
        if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":  # MlflowException's code for "not there"
            _UNUSABLE[uri] = first_line(err)
        raise


@dataclasses.dataclass(frozen=True)
class RunSummary:
    name: str | None
    run_id: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    params: dict[str, str]
    metrics: dict[str, float]  # the last value of each
    tags: dict[str, str] = dataclasses.field(default_factory=dict)  # the sft stage's runs: stage=sft


def newest_runs(tracking_uri: str, experiment: str, limit: int) -> list[RunSummary]:
    """The `limit` most recently started runs of an experiment (none if it does not exist); raises when the
    tracking server cannot be used or does not answer within TRACKER_WAIT_S."""
    mlflow = _import_mlflow()

    def listed() -> list[RunSummary]:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = client.search_runs([found.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"])
        return [RunSummary(r.info.run_name, r.info.run_id, r.info.status, dict(r.data.params), dict(r.data.metrics),
                           dict(r.data.tags))
                for r in runs]

    thread = TrackerThread()
    try:
        return _ask(thread, tracking_uri, listed)
    finally:
        thread.close()


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
    corrupt database, or no answer within TRACKER_WAIT_S): the stage writes its outputs all the same, and its end
    says what was not logged."""
    _UNUSABLE.clear()
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
    mlflow, thread = _import_mlflow(), TrackerThread()

    def found() -> Any:
        client = mlflow.MlflowClient(uri)
        client.get_run(trained.run_id)
        return client

    try:
        client = _ask(thread, uri, found)
    except Exception as err:  # connection errors, a missing run, a bad database, no answer: "cannot log there"
        thread.close()
        return _untracked(uri, f"MLflow run {trained.run_id} at {uri}: not reachable ({first_line(err)})", job)
    return ExistingRun(thread, client, trained.run_id, uri, job)


def _untracked(uri: str, reason: str, job: Job) -> UntrackedRun:
    log.warning("%s: the %s is not logged to MLflow", reason, job.name)
    return UntrackedRun(uri, reason, job)
