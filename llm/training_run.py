"""The train stage's run: its inputs read and checked once, the Trainer set up and resumed, the MLflow run opened
(or reopened, when the training resumes), the loop run with progress and tracking, and the outputs written:
models/final/, metrics/train.json, plots/train.csv and plots/attention.safetensors, on rank 0 only.
"""

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llm.attention import probe_ids, write_record
from llm.checkpoint import checkpoint_dirs
from llm.configs.mlflow import MlflowConfig
from llm.configs.model import ModelConfig
from llm.configs.train import TrainConfig
from llm.distributed import distributed_runtime
from llm.errors import Interrupted
from llm.fileio import write_json_atomic
from llm.history import HistoryRow, write_history_csv
from llm.lineage import ParamChanges, training_lineage
from llm.model import GPTConfig
from llm.model_io import save_model_dir
from llm.model_registry import log_trained_models
from llm.progress import TrainProgress
from llm.shards import SplitMeta, TokensMeta, read_meta
from llm.signals import StopSignals
from llm.tokenizer import load_tokenizer
from llm.tracking import MODEL_RUN_FILE, TrackedRun, log_run_card, model_run_record, start_training_run
from llm.train import Trainer, TrainResult, has_fast_bf16, pretraining_data

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainPaths:
    tokens: Path  # token shards and meta.json
    tokenizer: Path  # the tokenizer.json the shards were made with
    checkpoints: Path  # kept between runs, to resume
    out: Path  # the final model folder
    metrics: Path  # metrics/train.json
    plots: Path  # plots/train.csv
    attention: Path  # plots/attention.safetensors: the attention on one text at every evaluation


@dataclasses.dataclass(frozen=True)
class TrainInputs:
    """What the train stage reads before any work, read once: the model config with its vocabulary size from the
    tokenizer, the shards' metadata (checked to come from that tokenizer) and the attention probe's token ids."""

    model_cfg: GPTConfig
    meta: TokensMeta
    attention_ids: list[int]


def read_inputs(model: ModelConfig, paths: TrainPaths, attention_text: str) -> TrainInputs:
    """The train stage's inputs, checked (InputError names the file): run before any worker starts too."""
    tokenizer = load_tokenizer(paths.tokenizer)
    meta = read_meta(paths.tokens)
    meta.check_tokenizer(paths.tokens, paths.tokenizer)
    model_cfg = GPTConfig(**dataclasses.asdict(model), vocab_size=tokenizer.get_vocab_size())
    return TrainInputs(model_cfg, meta, probe_ids(tokenizer, attention_text, meta.eot_id, model_cfg.block_size))


def val_bpb_estimate(val_loss: float, val: SplitMeta) -> float:
    """Bits per byte from the sampled val loss and the val split's tokens per byte (EOT ids included). An
    estimate, logged as training goes; the evaluate stage's val_bpb scores every val token."""
    return val_loss * val.tokens / val.bytes / math.log(2)


def run_training(params: dict[str, Any], model: ModelConfig, cfg: TrainConfig, mlflow_cfg: MlflowConfig,
                 paths: TrainPaths, attention_text: str,
                 after_log: Callable[[HistoryRow], None] | None = None, changes: ParamChanges | None = None) -> None:
    """Train (every rank calls this) and write the outputs. `params` are all the run's settings, as MLflow
    records them; `changes`, those that differ from the committed params file (they name the run: llm/lineage.py;
    None when there is none to compare with); the attention on `attention_text` is recorded at every evaluation;
    `after_log` is called on rank 0 after each history row is logged (a test's fault injection). From here on
    SIGINT and SIGTERM are requests (llm/signals.py): the loop stops after a step and a checkpoint; once training
    is over, the outputs are written whole before the process exits."""
    started = time.monotonic()
    inputs = read_inputs(model, paths, attention_text)
    with StopSignals() as stop, distributed_runtime() as runtime:
        if not runtime.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        data = pretraining_data(inputs.meta, paths.tokens, inputs.model_cfg.block_size, inputs.model_cfg.vocab_size,
                                cfg.periodic_rows)
        trainer = Trainer(inputs.model_cfg, cfg, data, paths.checkpoints, runtime, inputs.attention_ids)
        if cfg.dtype == "auto":
            log.info("train.dtype auto: %s on this %s", trainer.cfg.dtype, runtime.device.type)
        progress, tracker_run_id = trainer.resume()
        run = None
        if runtime.is_main:
            tracked = {**params, "data_tokenizer_sha256": inputs.meta.tokenizer_sha256,
                       "data_train_tokens": inputs.meta.splits["train"].tokens,
                       "train_dtype_resolved": trainer.cfg.dtype}
            lineage = training_lineage(paths.tokens, paths.tokenizer, inputs.meta, changes, runtime.device.type,
                                       trainer.cfg.dtype, runtime.world_size, has_fast_bf16(torch.device("cpu")))
            run = start_training_run(mlflow_cfg, tracked, runtime.device.type, runtime.world_size, tracker_run_id,
                                     lineage=lineage)

        def on_log(row: HistoryRow) -> None:
            progress_bar.update(row)
            run.log_metrics({k: v for k, v in row.to_dict().items() if k != "step" and v is not None}, step=row.step)
            if after_log is not None:
                after_log(row)

        try:
            with TrainProgress(cfg.max_steps, interactive=None if runtime.is_main else False) as progress_bar:
                result = trainer.fit(progress, on_log=on_log, stop=stop,
                                     tracker_run_id=run.run_id if run is not None else None)
        except BaseException as err:
            if run is not None:
                run.finish("KILLED" if isinstance(err, Interrupted | KeyboardInterrupt) else "FAILED")
            raise
        if runtime.is_main:
            log_run_card(run, lineage.card, time.monotonic() - started)
            write_outputs(result, inputs.model_cfg, inputs.meta, run, paths, attention_text)


def write_outputs(result: TrainResult, model_cfg: GPTConfig, meta: TokensMeta, run: TrackedRun,
                  paths: TrainPaths, attention_text: str) -> None:
    """The outputs first, then the tracker (which never raises: what it cannot log is reported by finish)."""
    save_model_dir(paths.out, model_cfg, result.weights, paths.tokenizer, extra={MODEL_RUN_FILE: model_run_record(run)})
    metrics = {**result.metrics, "val_bpb_estimate": val_bpb_estimate(result.metrics["val_loss"], meta.splits["val"])}
    write_json_atomic(paths.metrics, {**metrics, "mlflow_run_id": run.run_id})
    write_history_csv(paths.plots, result.history)
    write_record(paths.attention, result.attention, attention_text)
    run.log_metrics({"val_bpb_estimate": metrics["val_bpb_estimate"]}, step=metrics["steps"])
    for artifact in (paths.out / "config.json", paths.out / "tokenizer.json", paths.plots):
        run.log_artifact(artifact)
    run.log_artifact(paths.out, "model")
    log_trained_models(run, paths.out, metrics["steps"], checkpoint_dirs(paths.checkpoints))
    run.finish()
    log.info("done: %d steps, train loss %.4f, val loss %.4f (about %.3f bits per byte), %.0f tokens/s, MFU %.1f%%",
             metrics["steps"], metrics["train_loss"], metrics["val_loss"], metrics["val_bpb_estimate"],
             metrics["tokens_per_sec"], 100 * metrics["mfu"])
