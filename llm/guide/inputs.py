"""What the guide reads: every stage's outputs, loaded once and checked, so a chapter only explains."""

import dataclasses
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from llm.attention import AttentionRecord, read_record
from llm.config import EOT
from llm.configs.data import DataConfig
from llm.configs.evaluate import EvaluateConfig
from llm.configs.mlflow import MlflowConfig
from llm.configs.tokenizer import TokenizerConfig
from llm.configs.train import TrainConfig
from llm.errors import InputError
from llm.fileio import read_utf8
from llm.history import HistoryRow, read_history_csv
from llm.model import GPT, initial_model
from llm.model_io import load_model_dir
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


@dataclasses.dataclass(frozen=True)
class GuideSettings:
    """The params the chapters explain (llm never reads params.yaml: the stage hands these over)."""

    data: DataConfig
    tokenizer: TokenizerConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    mlflow: MlflowConfig


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

    @property
    def eot_id(self) -> int:
        return self.meta.eot_id


def read_text(path: Path, stage: str) -> str:
    """A stage's text output; missing, it names the stage to run (read_utf8 says what else is wrong)."""
    if not Path(path).exists():
        raise InputError(f"{path}: not found; run the {stage} stage first")
    return read_utf8(path)


def read_json(path: Path, stage: str) -> dict[str, Any]:
    try:
        value = json.loads(read_text(path, stage))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err}); rerun the {stage} stage") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: not a JSON object; rerun the {stage} stage")
    return value


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
        clean=read_json(paths.clean_metrics, "clean"),
        tokenizer_report=read_json(paths.tokenizer_metrics, "tokenizer"),
        meta=meta, model=model.eval(), initial=initial_model(model.config, settings.train.seed).eval(),
        tokenizer=tokenizer,
        train_metrics=read_json(paths.train_metrics, "train"),
        history=read_history_csv(paths.train_plots),
        eval_metrics=read_json(paths.eval_metrics, "evaluate"),
        record=record, record_text=record_text,
        samples=read_text(paths.samples, "evaluate"),
    )
