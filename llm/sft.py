"""Instruction tuning, the sft stage: the base model (models/final/) trained further on conversations, the loss on
the assistant's tokens only, by the same Trainer as pretraining (llm/train.py) with other data and the base
weights to start from; then the held-out tasks scored before and after (llm/tasks.py).

A batch is a pure function of (seed, step, rank, micro-step), as pretraining's is: each row packs whole
conversations drawn by a generator seeded with them, then padding that trains nothing, so a resumed run draws
exactly the rows an uninterrupted one would.
"""

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

import llm.chat
import llm.sft_data
from llm.chat import ChatTokens, Conversation, EncodedConversation, encode_conversations, read_conversations
from llm.configs.data import DataConfig
from llm.configs.mlflow import MlflowConfig
from llm.configs.sft import SFTConfig
from llm.distributed import Runtime, default_device
from llm.documents import iter_documents
from llm.errors import ConfigError, InputError, Interrupted
from llm.fileio import sha256_file, write_json_atomic
from llm.history import HistoryRow, write_history_csv
from llm.lineage import ParamChanges, RunCard, tuning_lineage
from llm.model import GPT, IGNORE, GPTConfig, tied_aliases
from llm.model_io import load_model_dir, save_model_dir
from llm.model_registry import log_tuned_model
from llm.progress import TrainProgress
from llm.sft_data import READING_TASKS, SFTSet, build_sft_set
from llm.signals import StopSignals
from llm.split import is_val
from llm.tasks import TaskScore, context_copying, score_tasks
from llm.tracking import MODEL_RUN_FILE, TrackedRun, log_run_card, model_run_record, read_model_run, start_training_run
from llm.train import Trainer, TrainingData, TrainResult, code_sha256, has_fast_bf16

log = logging.getLogger(__name__)


class ConversationBatches:
    """Rows of block_size + 1 tokens packed with whole conversations; x is a row's first block_size tokens, y the
    next token of each, IGNORE where that token is not trained (prompts, padding)."""

    def __init__(self, encoded: list[EncodedConversation], block_size: int, pad_id: int, name: str) -> None:
        if not encoded:
            raise InputError(f"{name}: no conversation fits the context to train on")
        if any(len(c.ids) > block_size + 1 for c in encoded):
            raise ValueError(f"{name}: a conversation is longer than the context (llm.chat.fits_context)")
        self.block_size, self.pad_id = block_size, pad_id
        self.conversations = [(np.array(c.ids, dtype=np.int64), np.array(c.trained, dtype=bool)) for c in encoded]

    def row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One packed row: conversations drawn until the next one would not fit (the first always does)."""
        ids = np.full(self.block_size + 1, self.pad_id, dtype=np.int64)
        trained = np.zeros(self.block_size + 1, dtype=bool)
        filled = 0
        while True:
            conversation_ids, conversation_trained = self.conversations[rng.integers(len(self.conversations))]
            end = filled + len(conversation_ids)
            if end > self.block_size + 1:
                return ids, trained
            ids[filled:end], trained[filled:end] = conversation_ids, conversation_trained
            filled = end

    def batch(self, batch_size: int, seed: int, step: int, rank: int = 0, world_size: int = 1, micro_step: int = 0,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows [rank * batch_size, (rank + 1) * batch_size) of the global batch, which depends on
        (seed, step, micro_step) alone: the same rows whatever the number of ranks."""
        rng = np.random.default_rng([seed, step, micro_step])
        rows = [self.row(rng) for _ in range(batch_size * world_size)][rank * batch_size:(rank + 1) * batch_size]
        ids = torch.from_numpy(np.stack([r[0] for r in rows]))
        trained = torch.from_numpy(np.stack([r[1] for r in rows]))
        x, y = ids[:, :-1], torch.where(trained[:, 1:], ids[:, 1:], IGNORE)
        return x.contiguous().to(device), y.contiguous().to(device)


@dataclasses.dataclass(frozen=True)
class TuningData:
    """What the tuning trains on and is scored with, read and encoded once."""

    sft_set: SFTSet  # held-out questions and few-shot examples (and the generated conversations)
    train: list[EncodedConversation]
    val: list[EncodedConversation]  # the held-out questions with their answers: the val loss
    dropped: dict[str, int]  # conversations left out, by reason
    source_files: list[str]  # the JSONL files read (a source other than builtin)


def conversation_files(source: Path) -> list[Path]:
    """The .jsonl files of a local sft.source: a file, or a folder's (sorted, recursively)."""
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*.jsonl") if p.is_file())
        if files:
            return files
    raise InputError(f"sft.source: {source} is no .jsonl file nor a folder holding any")


def tuning_data(cfg: SFTConfig, documents: Iterable[tuple[str, str]], tokenizer: Tokenizer, tokens: ChatTokens,
                block_size: int, pretrained: Callable[[str], bool], conversations_dir: Path | None) -> TuningData:
    """The built-in set from the cleaned corpus (its held-out questions always; its training conversations unless
    `conversations_dir` holds the fetched JSONL of another sft.source), encoded and cut to the context."""
    fits = llm.sft_data.fits_context(tokenizer, tokens, block_size)
    sft_set = build_sft_set(documents, cfg, fits=fits, pretrained=pretrained)
    if conversations_dir is None and not sft_set.train:
        raise ConfigError("sft.source", "the built-in conversations are made from plays (speeches: a 'NAME.' line, "
                          "then the lines spoken), and data/clean holds none; point sft.source at your own "
                          "conversations (.jsonl), or stop at `dvc repro evaluate` and build the guide with "
                          "`python -m stages guide`")
    dropped: Counter = Counter()
    files: list[Path] = []
    conversations: list[Conversation] = sft_set.train
    if conversations_dir is not None:
        files = conversation_files(conversations_dir)
        conversations, dropped = read_conversations(files)
    train, too_long = encode_conversations(tokenizer, tokens, conversations, block_size)
    dropped.update(too_long)
    answered = [Conversation((*q.messages, llm.chat.Message("assistant", q.answer)))
                for questions in sft_set.questions.values() for q in questions]
    val, _ = encode_conversations(tokenizer, tokens, answered, block_size)
    if not val:  # no held-out questions (a corpus without plays): every 20th conversation is the val set instead
        train, val = [c for i, c in enumerate(train) if i % 20], train[::20]
    return TuningData(sft_set, train, val, dict(sorted(dropped.items())), [str(f) for f in files])


def read_tuning_data(cfg: SFTConfig, data_cfg: DataConfig, clean: Path, tokenizer: Tokenizer, tokens: ChatTokens,
                     block_size: int, conversations_dir: Path | None) -> TuningData:
    """tuning_data from the cleaned corpus at `clean` (data/clean/), knowing which documents the base model trained
    on: those in the train split of data.*. The sft stage and the guide read the same set by this one call."""
    def pretrained(doc_id: str) -> bool:
        return not is_val(doc_id, data_cfg.seed, data_cfg.val_fraction)

    # Streamed: only the plays parsed from it are kept, never the whole corpus.
    return tuning_data(cfg, iter_documents(clean), tokenizer, tokens, block_size, pretrained, conversations_dir)


def training_data(data: TuningData, block_size: int, pad_id: int, base_sha256: str) -> TrainingData:
    """The Trainer's data: packed conversation rows, identified by their tokens, the base weights and this code."""
    digest = hashlib.sha256()
    for conversation in [*data.train, *data.val]:
        digest.update(json.dumps([conversation.ids, conversation.trained]).encode())
    identity = {"conversations_sha256": digest.hexdigest(), "base_model_sha256": base_sha256,
                "code": {name: code_sha256(sys.modules[name]) for name in (__name__, "llm.chat")}}
    return TrainingData(ConversationBatches(data.train, block_size, pad_id, "the sft conversations"),
                        ConversationBatches(data.val, block_size, pad_id, "the held-out questions"), identity)


# --- the stage's run ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SFTPaths:
    base: Path  # the pretrained model folder (models/final/)
    clean: Path  # the cleaned corpus the built-in set is generated from (data/clean/)
    conversations: Path | None  # JSONL conversations of a source other than builtin; None: the built-in set
    checkpoints: Path  # kept between runs, to resume
    out: Path  # the tuned model folder (models/sft/)
    metrics: Path  # metrics/sft.json
    plots: Path  # plots/sft.csv


def score_table(base: dict[str, TaskScore], tuned: dict[str, TaskScore]) -> dict[str, dict[str, Any]]:
    """metrics/sft.json's tasks: per task the questions, chance, the base model's accuracy (few-shot) and the tuned
    model's (zero-shot), and how the answers were scored."""
    return {task: {"n": score.n, "chance": score.chance, "base_accuracy": base[task].accuracy if task in base else None,
                   "sft_accuracy": score.accuracy, "scoring": score.scoring, "too_long": score.too_long}
            for task, score in tuned.items()}


COPYING_PER_TASK = 8  # held-out prompts of each reading task that context_copying reads twice


def copying_texts(sft_set: SFTSet, tokenizer: Tokenizer, tokens: ChatTokens) -> list[list[int]]:
    """The first COPYING_PER_TASK held-out prompts (a passage and its question) of each reading task, as plain text
    ids: what llm.tasks.context_copying reads twice, to tell whether a model can use its context as the reading
    tasks ask."""
    return [llm.chat.encode_content(tokenizer, tokens, q.messages[-1].content)
            for task in READING_TASKS for q in sft_set.questions.get(task, [])[:COPYING_PER_TASK]]


def run_sft(cfg: SFTConfig, data_cfg: DataConfig, mlflow_cfg: MlflowConfig, paths: SFTPaths,
            params: dict[str, Any], changes: ParamChanges | None = None) -> dict[str, Any]:
    """Tune, score and write the outputs; the metrics written. `params` are the run's settings, as MLflow records
    them; `changes`, those that differ from the committed params file (they name the run, as a training's:
    llm/lineage.py; None when there is none to compare with). SIGINT and SIGTERM stop the tuning after a step and
    a checkpoint, as training's do."""
    started = time.monotonic()
    base, tokenizer = load_model_dir(paths.base)
    tokens = ChatTokens.from_tokenizer(tokenizer, paths.base / "tokenizer.json")
    block_size = base.config.block_size

    data = read_tuning_data(cfg, data_cfg, paths.clean, tokenizer, tokens, block_size, paths.conversations)
    log.info("sft: %d training conversations (%s dropped), %d held-out questions", len(data.train),
             sum(data.dropped.values()), len(data.val))
    runtime = Runtime(device=default_device())
    with StopSignals() as stop:  # only around the tuning: a signal while scoring stops the stage at once
        result, run, card = tune(base, cfg, data, tokens.eot, paths, mlflow_cfg, params, runtime, stop, changes)
    tuned = GPT(base.config)
    tuned.load_state_dict({**result.weights, **{a: result.weights[n] for a, n in tied_aliases(tuned).items()}})
    try:
        base_scores = score_tasks(base.to(runtime.device), tokenizer, tokens, data.sft_set.questions,
                                  data.sft_set.shots)
        tuned_scores = score_tasks(tuned.to(runtime.device).eval(), tokenizer, tokens, data.sft_set.questions)
        texts = copying_texts(data.sft_set, tokenizer, tokens)
        copying = ({"base": context_copying(base, texts).to_dict(), "tuned": context_copying(tuned, texts).to_dict()}
                   if texts else None)
    except BaseException as err:  # the tuning is checkpointed whole: a rerun resumes it and scores again
        run.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    metrics = {"tasks": score_table(base_scores, tuned_scores), **result.metrics,
               "train_conversations": len(data.train), "dropped": data.dropped, "counts": data.sft_set.counts,
               "base_model": str(paths.base), "context_copying": copying, "mlflow_run_id": run.run_id}
    log_run_card(run, card, time.monotonic() - started, stage="sft")
    write_sft_outputs(metrics, result, base.config, run, paths)
    return metrics


def tune(base: GPT, cfg: SFTConfig, data: TuningData, pad_id: int, paths: SFTPaths, mlflow_cfg: MlflowConfig,
         params: dict[str, Any], runtime: Runtime, stop: StopSignals,
         changes: ParamChanges | None = None) -> tuple[TrainResult, TrackedRun, RunCard]:
    """The tuning: the Trainer resumed (or started from the base weights) and run, logged to an MLflow run tagged
    with the base model's run and named, tagged and carded as a training's (llm/lineage.py); (the result, the
    run, the card to log once the stage's time is known)."""
    block_size = base.config.block_size
    base_weights = {name: t.detach().clone() for name, t in base.state_dict().items()}
    data_for_trainer = training_data(data, block_size, pad_id, sha256_file(paths.base / "model.safetensors"))
    trainer = Trainer(base.config, cfg.training(), data_for_trainer, paths.checkpoints, runtime,
                      initial_weights=base_weights)
    progress, tracker_run_id = trainer.resume()
    base_run = read_model_run(paths.base)
    lineage = tuning_lineage([paths.base, paths.clean], changes, runtime.device.type, trainer.cfg.dtype,
                             has_fast_bf16(torch.device("cpu")))
    run = start_training_run(mlflow_cfg, params, runtime.device.type, 1, tracker_run_id,
                             tags={"stage": "sft", "base_run_id": base_run.run_id if base_run else "none"},
                             lineage=lineage)
    try:
        with TrainProgress(cfg.max_steps) as bar:
            def on_log(row: HistoryRow) -> None:
                bar.update(row)
                run.log_metrics({f"sft_{k}": v for k, v in row.to_dict().items() if k != "step" and v is not None},
                                step=row.step)

            return trainer.fit(progress, on_log=on_log, stop=stop, tracker_run_id=run.run_id), run, lineage.card
    except BaseException as err:
        run.finish("KILLED" if isinstance(err, Interrupted | KeyboardInterrupt) else "FAILED")
        raise


def write_sft_outputs(metrics: dict[str, Any], result: TrainResult, model_cfg: GPTConfig, run: TrackedRun,
                      paths: SFTPaths) -> None:
    """models/sft/, metrics/sft.json, plots/sft.csv, then the tracker (which never raises)."""
    save_model_dir(paths.out, model_cfg, result.weights, paths.base / "tokenizer.json",
                   extra={MODEL_RUN_FILE: model_run_record(run)})
    write_json_atomic(paths.metrics, metrics)
    write_history_csv(paths.plots, result.history)
    accuracies = {f"{task}_{which}": score[f"{which}_accuracy"] for task, score in metrics["tasks"].items()
                  for which in ("base", "sft") if score[f"{which}_accuracy"] is not None}
    run.log_metrics(accuracies, step=result.metrics["steps"])
    run.log_artifact(paths.metrics)
    run.log_artifact(paths.out, "model")
    log_tuned_model(run, paths.out, result.metrics["steps"])
    run.finish()
    for task, score in metrics["tasks"].items():
        log.info("sft: %-24s n=%3d chance %.2f  base %.2f  tuned %.2f", task, score["n"], score["chance"],
                 score["base_accuracy"] or 0.0, score["sft_accuracy"])
