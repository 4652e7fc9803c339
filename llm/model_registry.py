"""Trained models in MLflow: each logged as a LoggedModel of its training run (a pyfunc from code, llm/mlflow_model.py,
whose artifacts are our model folder), its evaluation linked to it, the best one on a val set registered under the
alias `champion`, and a registered model downloaded back into a model folder.

Everything here runs on the stage's TrackerThread (llm/tracking.py): `log_model_now` and `evaluation_task` are
handed to a run's backlog, which retries them and reports what the tracker did not take; `download_model` is asked
with a bound on the wait. So a tracker that fails costs a stage no outputs, as for every other record.
"""

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from llm.configs.evaluate import EvaluateConfig
from llm.configs.mlflow import MlflowConfig
from llm.errors import InputError, first_line
from llm.lineage import InputDataset
from llm.project import project_root
from llm.tracking import TrackedRun, TrackerThread, _ask, _import_mlflow, dataset_input, resolve_tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"  # the alias of the registered model's best version
# What the served model needs besides the `llm` package of this project (the model's code imports it): written into
# the model so that MLflow does not load the model in a subprocess at every log to infer them.
REQUIREMENTS = ("mlflow", "torch", "tokenizers", "safetensors", "numpy")
# The artifact (a folder) a logged model's files are under, as its code (MODEL_CODE) finds them.
MODEL_ARTIFACT = "model"
# The code MLflow loads each kind of model with: referred to by path, not imported, so that the stages logging a model
# do not depend on it (changing how a model is served must not retrain it).
MODEL_CODE = {"text": Path(__file__).with_name("mlflow_model.py"), "chat": Path(__file__).with_name(
    "mlflow_chat_model.py")}
# The LoggedModel's tag that says which folder it is: "final", "checkpoint" or SFT (the sft stage's tuned model).
ROLE_TAG = "llm.role"
SFT = "sft"


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """The three files of a model folder (llm/model_io.py); a checkpoint has its own weights and the run's config
    and tokenizer."""

    weights: Path
    config: Path
    tokenizer: Path

    @classmethod
    def of_dir(cls, model_dir: Path) -> "ModelFiles":
        return cls(model_dir / "model.safetensors", model_dir / "config.json", model_dir / "tokenizer.json")

    def staged(self, folder: Path) -> Path:
        """The three files, and only them, in `folder` (linked where the file system allows: no copy)."""
        folder.mkdir(parents=True, exist_ok=True)
        for source, name in ((self.weights, "model.safetensors"), (self.config, "config.json"),
                             (self.tokenizer, "tokenizer.json")):
            try:
                os.link(source, folder / name)
            except OSError:
                shutil.copyfile(source, folder / name)
        return folder


def text_signature(defaults: EvaluateConfig) -> Any:
    """prompts in (a `prompt` column), generated texts out, generate's flags as params with the evaluate section's
    defaults (seed: none, a random one, as generate without --seed)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([ParamSpec("max_new_tokens", "long", defaults.max_new_tokens),
                          ParamSpec("temperature", "double", defaults.temperature),
                          ParamSpec("top_k", "long", defaults.top_k),
                          ParamSpec("top_p", "double", defaults.top_p),
                          ParamSpec("seed", "long", None)])
    return ModelSignature(Schema([ColSpec("string", "prompt")]), Schema([ColSpec("string", "text")]), params)


def load_artifacts(artifacts: dict[str, str]) -> tuple[Any, Any, Path]:
    """(model, tokenizer, folder) from a logged model's artifacts (its context.artifacts), on the default device."""
    from llm.distributed import default_device
    from llm.model_io import load_model_dir

    folder = Path(artifacts[MODEL_ARTIFACT])
    model, tokenizer = load_model_dir(folder, default_device())
    return model, tokenizer, folder


def log_model_now(files: ModelFiles, name: str, step: int, role: str, run_id: str) -> str:
    """On the tracker thread, where the training's run `run_id` is active: log the model as a LoggedModel of the
    run at `step`; its model id. A base model continues text; the sft stage's model (`role` "sft") chats (the base
    tokenizer holds the chat tokens too, so the tokenizer cannot tell them apart)."""
    mlflow = _import_mlflow()
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:  # MLflow would log it to another run, or start one
        raise RuntimeError(f"run {run_id} is not the active run of the tracker thread")
    kind = "chat" if role == SFT else "text"
    # MLflow suggests an input example: it would run the model at every log.
    with tempfile.TemporaryDirectory(prefix="llm-model-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folder = files.staged(Path(tmp) / MODEL_ARTIFACT)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(MODEL_CODE[kind]), artifacts={MODEL_ARTIFACT: str(folder)},
            signature=text_signature(EvaluateConfig()) if kind == "text" else None,
            pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENTS], step=step,
            tags={ROLE_TAG: role})
    return info.model_id


# --- evaluation: the metrics linked to the model, and the champion ----------------------------------------------

def scored_val_set(val: InputDataset, max_tokens: int) -> InputDataset:
    """The val set an evaluation scores: the val split as the training run records it (llm/lineage.py's val_dataset,
    whose digest changes exactly when a val shard does), scored whole; or, with evaluate.max_tokens, evenly spaced
    windows of it: a set of its own, by name, since scores compare only when taken on the same tokens."""
    if not max_tokens:
        return val
    return dataclasses.replace(val, name=f"{val.name} (max_tokens={max_tokens})",
                               profile={**val.profile, "max_tokens": max_tokens})


LINKED = ("val_bpb", "val_loss")  # the evaluation's metrics that name the model and the val set


def evaluation_task(results: dict[str, float], val: InputDataset,
                    registered_model: str) -> Callable[[Any, str], None]:
    """What evaluation adds for the model of run `run_id` (task(client, run_id), on the tracker thread): the val set
    as an input of the run; `eval/val_bpb` and `eval/val_loss` linked to the run's final LoggedModel and to the val
    set (the run has them already, unlinked: the stage logs every eval metric to it whether or not this succeeds);
    with `registered_model`, the registry step (`promote`). Safe to retry: a retry adds no model version and moves
    the alias by the same rule."""

    def task(client: Any, run_id: str) -> None:
        from mlflow.entities import Metric

        model = final_model(client, run_id)
        client.log_inputs(run_id, [dataset_input(val)])
        if model is None:
            log.warning("MLflow run %s has no logged model: the evaluation is not linked to one%s", run_id,
                        ", and the registry step is skipped" if registered_model else "")
            return
        stamp = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"eval/{key}", float(results[key]), stamp, 0, model_id=model.model_id,
                                                 dataset_name=val.name, dataset_digest=val.digest)
                                          for key in LINKED])
        if registered_model:
            promote(client, registered_model, model.model_id, results["val_bpb"], val)

    return task


def final_model(client: Any, run_id: str) -> Any:
    """The newest LoggedModel the train stage logged as its final model in run `run_id`; None when there is none."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND tags.`{ROLE_TAG}` = 'final'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1)
    return found[0] if found else None


def linked_bpb(model: Any, val: InputDataset) -> float | None:
    """The model's eval/val_bpb on the val set `val` (its name and digest); None when it was not scored on it."""
    scores = [m for m in model.metrics or []
              if m.key == "eval/val_bpb" and (m.dataset_name, m.dataset_digest) == (val.name, val.digest)]
    return min(scores, key=lambda m: m.timestamp).value if scores else None


def version_model_id(model_version: Any) -> str:
    """The LoggedModel a registered version was made from (its source, models:/MODEL_ID: the SQL registry leaves
    the version's model_id empty)."""
    return model_version.model_id or model_version.source.removeprefix("models:/")


def link_version(client: Any, model_id: str, name: str, version: Any) -> None:
    """Name the registered version on its LoggedModel (the tag mlflow.register_model sets), so that the UI's Models
    tab shows it; once, also when retried."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    entry = {"name": name, "version": str(version)}
    linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if entry not in linked:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})


def promote(client: Any, name: str, model_id: str, val_bpb: float, val: InputDataset) -> None:
    """Register the model under `name` (once) and move the alias `champion` to it when its val bpb beats the
    champion's on the same val set; one line says what was decided."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    source = f"models:/{model_id}"
    mine = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == source]
    ours = mine[0] if mine else client.create_model_version(name, source, model_id=model_id)
    link_version(client, model_id, name, ours.version)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and champion.version == ours.version:
        log.info("%s version %s is the %s already", name, ours.version, CHAMPION)
        return
    if champion is not None:
        best = linked_bpb(client.get_logged_model(version_model_id(champion)), val)
        if best is None:
            log.info("%s@%s (version %s) was not scored on this val set (%s, digest %s): not compared, the alias "
                     "stays", name, CHAMPION, champion.version, val.name, val.digest)
            return
        if not val_bpb < best:
            log.info("%s version %s: val bpb %.4f does not beat %s@%s (version %s, %.4f): the alias stays", name,
                     ours.version, val_bpb, name, CHAMPION, champion.version, best)
            return
    client.set_registered_model_alias(name, CHAMPION, ours.version)
    log.info("%s@%s is now version %s (val bpb %.4f)%s", name, CHAMPION, ours.version, val_bpb,
             f", replacing version {champion.version}" if champion is not None else "")


# --- a registered model, back into a model folder ------------------------------------------------------------

def is_model_uri(location: str | Path) -> bool:
    """models:/NAME@ALIAS, models:/NAME/VERSION or models:/MODEL_ID: a model MLflow holds, not a folder."""
    return str(location).startswith("models:/")


def download_model(uri: str, cfg: MlflowConfig, dst: Path) -> Path:
    """The model folder (config.json, model.safetensors, tokenizer.json) of the MLflow model at `uri`, downloaded
    from params' tracking URI into `dst`. InputError (one line) when it is not there or the tracker cannot give it."""
    mlflow = _import_mlflow()
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri, project_root())
    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri  # the evaluate stage's registry
    thread = TrackerThread()

    def fetch() -> Path:
        with thread.upload():
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                       tracking_uri=tracking_uri, registry_uri=registry_uri)
        return Path(path) / "artifacts" / MODEL_ARTIFACT

    try:
        folder = _ask(thread, tracking_uri, fetch)
    except Exception as err:
        raise InputError(f"{uri}: cannot be downloaded from MLflow at {tracking_uri} ({first_line(err)})") from None
    finally:
        thread.close()
    if not (folder / "config.json").is_file():
        raise InputError(f"{uri}: not a model of this project (no artifacts/{MODEL_ARTIFACT}/config.json)")
    return folder


def log_trained_models(run: TrackedRun, model_dir: Path, step: int, checkpoints: list[Path]) -> None:
    """Hand the train stage's models to its run (`run.call`: logged on the tracker thread, retried, reported when not
    logged): the final model at `step`, and each checkpoint before it at its own step (the checkpoint at `step`
    holds the final model's weights: it is not logged twice). Each names the run's config and tokenizer."""
    from llm.checkpoint import checkpoint_step

    final = ModelFiles.of_dir(model_dir)
    models = [(final, "final", step, "final")]
    for checkpoint in sorted(checkpoints):
        if checkpoint_step(checkpoint) < step:
            models.append((dataclasses.replace(final, weights=checkpoint / "model.safetensors"), checkpoint.name,
                           checkpoint_step(checkpoint), "checkpoint"))
    for files, name, at, role in models:
        run.call(f"the model {name}", lambda client, run_id, f=files, n=name, s=at, r=role:
                 log_model_now(f, n, s, r, run_id), upload=True)


def log_tuned_model(run: TrackedRun, model_dir: Path, step: int) -> None:
    """Hand the sft stage's model to its run, as log_trained_models does: a chat model (llm/mlflow_chat_model.py)."""
    run.call(f"the model {SFT}", lambda client, run_id: log_model_now(ModelFiles.of_dir(model_dir), SFT, step, SFT,
                                                                       run_id), upload=True)
