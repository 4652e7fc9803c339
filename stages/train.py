import csv
import dataclasses
import io
import logging
import math
import os
import subprocess
from pathlib import Path

import torch
import typer

from llm.data import read_meta
from llm.distributed import distributed_runtime
from llm.errors import InputError
from llm.fileio import write_bytes_atomic, write_json_atomic
from llm.model import GPTConfig
from llm.model_io import save_model_dir
from llm.progress import TrainProgress
from llm.tokenizer import file_sha256, load_tokenizer
from llm.tracking import MlflowRun, resolve_tracking_uri
from llm.train import resumable_state
from llm.train import train as train_model
from stages.cli import PARAMS, stage
from stages.params import load_params

log = logging.getLogger(__name__)

PLOT_COLUMNS = ["step", "train_loss", "val_loss", "lr", "tokens_per_sec"]


def project_root() -> Path:
    """The outermost folder above the working directory that holds .dvc/: the repository, also when DVC
    runs an experiment in a temporary copy inside it."""
    here = Path.cwd().resolve()
    roots = [p for p in (here, *here.parents) if (p / ".dvc").is_dir()]
    return roots[-1] if roots else here


def git_commit(root: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


@stage
def train(
    params: Path = PARAMS,
    tokens: Path = typer.Option(Path("data/tokens"), help="token shards and meta.json"),
    tokenizer: Path = typer.Option(Path("models/tokenizer/tokenizer.json"), help="the tokenizer"),
    checkpoints: Path = typer.Option(Path("models/checkpoints"), help="checkpoints, kept between runs to resume"),
    out: Path = typer.Option(Path("models/final"), help="final model: config.json, model.safetensors, tokenizer.json"),
    metrics: Path = typer.Option(Path("metrics/train.json"), help="final training metrics"),
    plots: Path = typer.Option(Path("plots/train.csv"), help="loss curves: one row per log step"),
) -> None:
    """Train the transformer (launch with torchrun for several processes); resume from a compatible
    checkpoint; rank 0 writes the outputs and logs to MLflow."""
    cfg = load_params(params)
    tok = load_tokenizer(tokenizer)
    meta = read_meta(tokens)
    if meta["tokenizer_sha256"] != file_sha256(tokenizer):
        raise InputError(f"{tokens}/meta.json: shards were made with another tokenizer than {tokenizer}; "
                         "rerun the tokenize stage")
    model_cfg = GPTConfig(**dataclasses.asdict(cfg.model), vocab_size=tok.get_vocab_size())
    model_cfg.validate()

    with distributed_runtime() as runtime:
        if not runtime.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        run, run_state = None, None
        if runtime.is_main:
            resumed = resumable_state(model_cfg, cfg.train, tokens, checkpoints) or {}
            run = start_mlflow_run(cfg, meta, resumed.get("mlflow_run_id"))
            run_state = {"mlflow_run_id": run.run_id}

        def on_log(row: dict) -> None:
            progress.update(row)
            run.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])
            fail_for_testing(row["step"])

        try:
            with TrainProgress(cfg.train.max_steps, interactive=None if runtime.is_main else False) as progress:
                result = train_model(model_cfg, cfg.train, tokens, checkpoints, runtime, on_log=on_log,
                                     run_state=run_state)
        except BaseException:
            if run is not None:
                run.finish("FAILED")
            raise
        if runtime.is_main:
            write_outputs(result, model_cfg, meta, run, tokenizer, out, metrics, plots)


def start_mlflow_run(cfg, meta: dict, resume_run_id: str | None = None) -> MlflowRun:
    root = project_root()
    tags = {"git_commit": git_commit(root), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "world_size": os.environ.get("WORLD_SIZE", "1")}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    tracked = {**cfg.to_dict(), "data_tokenizer_sha256": meta["tokenizer_sha256"],
               "data_train_tokens": meta["splits"]["train"]["tokens"], "git_commit": tags["git_commit"]}
    run = MlflowRun(cfg.mlflow, root, tracked, tags, run_name=os.environ.get("DVC_EXP_NAME"),
                    resume_run_id=resume_run_id)
    log.info("MLflow run %s in experiment %r at %s%s", run.run_id, cfg.mlflow.experiment, run.uri,
             " (reopened: training resumes from a checkpoint)" if run.resumed else "")
    return run


@stage
def tracking_uri(params: Path = PARAMS) -> None:
    """Print mlflow.tracking_uri as the stages use it (a relative SQLite path made absolute): `make ui`."""
    typer.echo(resolve_tracking_uri(load_params(params).mlflow.tracking_uri, project_root()))


def fail_for_testing(step: int) -> None:
    """Fault injection for the restart test: LLM_FAIL_AT_STEP=N kills rank 0 once it has logged step N, on
    torchrun's first attempt only (it counts restarts in TORCHELASTIC_RESTART_COUNT)."""
    fail_at = os.environ.get("LLM_FAIL_AT_STEP")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if fail_at and first_attempt and step >= int(fail_at):
        os._exit(17)


def write_outputs(result, model_cfg: GPTConfig, meta: dict, run: MlflowRun, tokenizer: Path, out: Path,
                  metrics: Path, plots: Path) -> None:
    save_model_dir(out, model_cfg, result.weights, tokenizer,
                   extra={"mlflow_run.json": {"run_id": run.run_id, "tracking_uri": run.uri}})
    # Bits per byte, from the sampled val loss and the val split's tokens per byte (EOT ids included).
    val = meta["splits"]["val"]
    val_bpb = result.metrics["val_loss"] * val["tokens"] / val["bytes"] / math.log(2)
    run.log_metrics({"val_bpb": val_bpb}, step=result.metrics["steps"])
    write_json_atomic(metrics, {**result.metrics, "val_bpb": val_bpb, "mlflow_run_id": run.run_id})
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=PLOT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "val_loss": "" if row["val_loss"] is None else row["val_loss"]} for row in result.history)
    write_bytes_atomic(plots, table.getvalue().encode())

    run.log_artifact(out / "config.json")
    run.log_artifact(out / "tokenizer.json")
    run.log_artifact(plots)
    run.log_artifact(out, "model")
    run.finish()
    m = result.metrics
    log.info("done: %d steps, train loss %.4f, val loss %.4f (%.3f bits per byte), %.0f tokens/s, MFU %.1f%%",
             m["steps"], m["train_loss"], m["val_loss"], val_bpb, m["tokens_per_sec"], 100 * m["mfu"])
