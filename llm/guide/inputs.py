"""What the guide reads: every stage's outputs, loaded once and checked, so a chapter only explains."""

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from llm.attention import AttentionRecord, read_record
from llm.chat import ChatTokens
from llm.config import EOT
from llm.configs.data import DataConfig
from llm.configs.evaluate import EvaluateConfig
from llm.configs.mlflow import MlflowConfig
from llm.configs.sft import SFTConfig
from llm.configs.tokenizer import TokenizerConfig
from llm.configs.train import TrainConfig
from llm.errors import InputError, first_line
from llm.fileio import read_utf8
from llm.history import HistoryRow, read_history_csv
from llm.model import GPT, initial_model
from llm.model_io import load_model_dir
from llm.sft import read_tuning_data
from llm.sft_data import Question
from llm.shards import TokensMeta, read_meta


@dataclasses.dataclass(frozen=True)
class GuidePaths:
    raw: Path  # data/raw: the fetched corpus
    clean_metrics: Path  # metrics/clean.json
    tokenizer_metrics: Path  # metrics/tokenizer.json
    tokens: Path  # data/tokens: shards and meta.json
    model: Path  # models/final
    train_metrics: Path  # metrics/train.json
    train_plots: Path  # plots/train.csv
    attention: Path  # plots/attention.safetensors
    eval_metrics: Path  # metrics/eval.json
    samples: Path  # reports/samples.md
    out: Path  # reports/guide, replaced whole
    clean: Path  # data/clean: the held-out questions of the sft chapter are generated from it, as sft does
    sft_model: Path  # models/sft
    sft_metrics: Path  # metrics/sft.json; absent: the sft stage has not run, and its chapter says how to run it
    sft_plots: Path  # plots/sft.csv


@dataclasses.dataclass(frozen=True)
class GuideSettings:
    """The params the chapters explain (llm never reads params.yaml: the stage hands these over)."""

    data: DataConfig
    tokenizer: TokenizerConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    mlflow: MlflowConfig
    sft: SFTConfig


@dataclasses.dataclass
class Run:
    """One finished run of the pipeline, as its stages left it."""

    paths: GuidePaths
    settings: GuideSettings
    clean: dict[str, Any]
    tokenizer_report: dict[str, Any]
    meta: TokensMeta
    model: GPT  # the final model, on the CPU, in eval mode
    initial: GPT  # the weights training started from (train.seed)
    tokenizer: Tokenizer
    train_metrics: dict[str, Any]
    history: list[HistoryRow]
    eval_metrics: dict[str, Any]
    record: AttentionRecord
    record_text: str
    samples: str  # reports/samples.md
    sft: "SFTRun | None"  # None: the sft stage has not run (no metrics/sft.json)

    @property
    def eot_id(self) -> int:
        return self.meta.eot_id


def read_text(path: Path, stage: str) -> str:
    """A stage's text output; missing, it names the stage to run (read_utf8 says what else is wrong)."""
    if not Path(path).exists():
        raise InputError(f"{path}: not found; run the {stage} stage first")
    return read_utf8(path)


# What each kind of metrics field must hold, and how an error says it.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "amount": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
               "a finite non-negative number"),
    "loss": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and not v < 0,
             "a non-negative number (or NaN: not measured)"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "id": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "counts": (lambda v: isinstance(v, dict) and all(_KINDS["count"][0](n) for n in v.values()),
               "an object of non-negative integers"),
}
# The metrics files the guide reads: the fields it uses must be there, of their kind (an older report may lack
# an optional one); any field it knows that is there must be of its kind.
CLEAN_FIELDS = {"documents_in": "count", "documents_out": "count", "bytes_in": "count", "bytes_out": "count"}
CLEAN_OPTIONAL = {"control_chars_removed": "count", "gutenberg_stripped": "count",
                  "special_tokens_neutralised": "count", "dropped": "counts", "dropped_bytes": "counts"}
TOKENIZER_FIELDS = {"vocab_size": "count", "val_bytes_per_token": "amount"}
TOKENIZER_OPTIONAL = {"train_chars_used": "count", "train_documents": "count", "train_documents_used": "count",
                      "val_bytes": "count", "val_tokens": "count"}
TRAIN_FIELDS = {"steps": "count", "tokens_seen": "count", "train_loss": "loss", "val_loss": "loss",
                "tokens_per_sec": "amount", "mfu": "amount", "peak_flops": "amount", "peak_flops_source": "text",
                "dtype": "text"}
TRAIN_OPTIONAL = {"flops_per_token": "amount", "parameters": "count", "mlflow_run_id": "id",
                  "resumed_from_step": "count", "val_bpb_estimate": "loss"}
EVAL_FIELDS = {"val_bpb": "amount"}
EVAL_OPTIONAL = {"val_loss": "amount", "val_perplexity": "amount", "val_tokens": "count", "val_bytes": "count",
                 "mlflow_run_id": "id"}


@dataclasses.dataclass
class SFTRun:
    """The instruction tuning, as the sft stage left it, and the held-out questions it was scored on."""

    model: GPT  # models/sft, on the CPU, in eval mode
    tokens: ChatTokens
    metrics: dict[str, Any]  # metrics/sft.json; its "tasks" checked by read_sft_metrics
    history: list[HistoryRow]  # plots/sft.csv
    questions: dict[str, list[Question]]  # by task, as the sft stage generated them (llm.sft.read_tuning_data)


def read_json(path: Path, stage: str, fields: dict[str, str] | None = None,
              optional: dict[str, str] | None = None) -> dict[str, Any]:
    """A stage's JSON object; `fields` (name -> kind) must be there and `optional` ones, if there, of their kind.
    Anything else is an InputError naming the file and the field: a chapter then uses what it reads as it is."""
    try:
        value = json.loads(read_text(path, stage))
    except (json.JSONDecodeError, RecursionError) as err:
        raise InputError(f"{path}: not valid JSON ({first_line(err)}); rerun the {stage} stage") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: not a JSON object; rerun the {stage} stage")
    for name, kind in {**(optional or {}), **(fields or {})}.items():
        (holds, description) = _KINDS[kind]
        if (name in value or name in (fields or {})) and not holds(value.get(name)):
            raise InputError(f"{path}: field {name!r} is missing or not {description}; rerun the {stage} stage")
    return value


def read_tokenizer_report(path: Path) -> dict[str, Any]:
    """metrics/tokenizer.json; its three counts of what the tokenizer trained on come together or not at all (an
    older report lacks them)."""
    report = read_json(path, "tokenizer", TOKENIZER_FIELDS, TOKENIZER_OPTIONAL)
    together = ("train_chars_used", "train_documents", "train_documents_used")
    present = [name for name in together if name in report]
    if present and len(present) < len(together):
        missing = next(name for name in together if name not in report)
        raise InputError(f"{path}: field {missing!r} is missing (it goes with {present[0]!r}); rerun the tokenizer "
                         "stage")
    return report


SFT_FIELDS = {"steps": "count"}
SFT_TASK_FIELDS = {"n": "count", "chance": "amount", "sft_accuracy": "amount", "scoring": "text"}


def read_sft_metrics(path: Path) -> dict[str, Any]:
    """metrics/sft.json: its training fields, and per task of "tasks" the questions, chance, the accuracies (the
    base model's may be null: not scored) and how it was scored."""
    metrics = read_json(path, "sft", SFT_FIELDS)
    tasks = metrics.get("tasks")
    if not isinstance(tasks, dict):
        raise InputError(f"{path}: field 'tasks' is missing or not an object; rerun the sft stage")
    for task, score in tasks.items():
        if not isinstance(score, dict):
            raise InputError(f"{path}: task {task!r} is not an object; rerun the sft stage")
        scored = {**SFT_TASK_FIELDS, **({"base_accuracy": "amount"} if score.get("base_accuracy") is not None else {})}
        for name, kind in scored.items():
            (holds, description) = _KINDS[kind]
            if not holds(score.get(name)):
                raise InputError(f"{path}: field {name!r} of task {task!r} is missing or not {description}; rerun "
                                 "the sft stage")
    return metrics


def load_sft(paths: GuidePaths, settings: GuideSettings) -> SFTRun | None:
    """The sft stage's outputs and questions; None when it has not run (no metrics/sft.json)."""
    if not paths.sft_metrics.exists():
        return None
    metrics = read_sft_metrics(paths.sft_metrics)
    for path in (paths.sft_model, paths.sft_plots):
        if not path.exists():
            raise InputError(f"{path}: not found; run the sft stage first")
    model, tokenizer = load_model_dir(paths.sft_model, "cpu")
    tokens = ChatTokens.from_tokenizer(tokenizer, paths.sft_model / "tokenizer.json")
    data = read_tuning_data(settings.sft, settings.data, paths.clean, tokenizer, tokens, model.config.block_size,
                            None)
    return SFTRun(model=model.eval(), tokens=tokens, metrics=metrics, history=read_history_csv(paths.sft_plots),
                  questions=data.sft_set.questions)


def load_run(paths: GuidePaths, settings: GuideSettings) -> Run:
    if not paths.raw.is_dir():
        raise InputError(f"{paths.raw}: not found; run the fetch stage first")
    meta = read_meta(paths.tokens)
    model, tokenizer = load_model_dir(paths.model, "cpu")
    meta.check_tokenizer(paths.tokens, paths.model / "tokenizer.json")
    if tokenizer.token_to_id(EOT) != meta.eot_id:
        raise InputError(f"{paths.model / 'tokenizer.json'}: its {EOT} id differs from {paths.tokens}/meta.json")
    if not paths.train_plots.is_file():
        raise InputError(f"{paths.train_plots}: not found; run the train stage first")
    record, record_text = read_record(paths.attention)
    return Run(
        paths=paths, settings=settings,
        clean=read_json(paths.clean_metrics, "clean", CLEAN_FIELDS, CLEAN_OPTIONAL),
        tokenizer_report=read_tokenizer_report(paths.tokenizer_metrics),
        meta=meta, model=model.eval(), initial=initial_model(model.config, settings.train.seed).eval(),
        tokenizer=tokenizer,
        train_metrics=read_json(paths.train_metrics, "train", TRAIN_FIELDS, TRAIN_OPTIONAL),
        history=read_history_csv(paths.train_plots),
        eval_metrics=read_json(paths.eval_metrics, "evaluate", EVAL_FIELDS, EVAL_OPTIONAL),
        record=record, record_text=record_text,
        samples=read_text(paths.samples, "evaluate"),
        sft=load_sft(paths, settings),
    )
