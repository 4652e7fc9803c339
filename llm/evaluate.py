"""Scoring a model on token streams: loss (nats per token), perplexity, and bits per UTF-8 byte.

Bits per byte divides the total negative log-likelihood (in bits) by the number of bytes the predicted
tokens decode to, so models with different tokenizers compare on the same footing. A stream is scored in
consecutive windows of block_size predictions: every token after the first is predicted exactly once, from
the tokens before it in its window (at most block_size of them).
"""

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from llm.config import EOT
from llm.configs.evaluate import EvaluateConfig
from llm.configs.mlflow import MlflowConfig
from llm.distributed import default_device
from llm.errors import InputError
from llm.fileio import read_utf8, write_json_atomic
from llm.history import read_history_csv
from llm.lineage import val_dataset
from llm.model import GPT, initial_model
from llm.model_io import load_model_dir
from llm.model_registry import evaluation_task, scored_val_set
from llm.report import write_reports
from llm.shards import open_shard, read_meta
from llm.tracking import Job, read_model_run, run_of_model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Score:
    nats: float  # summed negative log-likelihood of the predicted tokens
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes those tokens decode to (special tokens decode to none)

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bpb(self) -> float:
        return self.nats / math.log(2) / self.bytes

    def __add__(self, other: "Score") -> "Score":
        return Score(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes each token id decodes to. In a byte-level BPE vocabulary every character of a token stands for
    one byte; added (special) tokens such as <|endoftext|> stand for no text."""
    alphabet = set(ByteLevel.alphabet())
    special = set(tokenizer.get_added_tokens_decoder())
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id in special:
            continue
        if not set(token) <= alphabet:
            raise InputError(f"token {token!r} is not byte-level BPE: bits per byte cannot be computed")
        lengths[token_id] = len(token)
    return lengths


def stream_windows(num_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive windows over a stream: each holds up to block_size + 1 tokens and the
    next one starts at the previous one's last token, so each token but the first is a target once."""
    return [(start, min(start + block_size + 1, num_tokens)) for start in range(0, num_tokens - 1, block_size)]


@torch.no_grad()
def score_windows(model: GPT, stream: np.ndarray, windows: list[tuple[int, int]], byte_lengths: np.ndarray,
                  batch_size: int = 16) -> Score:
    """Score the given windows of a token stream; windows of the same length go through the model together."""
    model.eval()
    device = model.device
    total = Score(0.0, 0, 0)
    by_length: dict[int, list[int]] = {}
    for start, end in windows:
        by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        for i in range(0, len(starts), batch_size):
            batch = np.stack([stream[s:s + length] for s in starts[i:i + batch_size]]).astype(np.int64)
            tokens = torch.from_numpy(batch).to(device)
            logits, _ = model(tokens[:, :-1])
            targets = tokens[:, 1:]
            nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            total += Score(float(nats), targets.numel(), int(byte_lengths[batch[:, 1:]].sum()))
    return total


def score_ids(model: GPT, ids: list[int] | np.ndarray, byte_lengths: np.ndarray, batch_size: int = 16) -> Score:
    stream = np.asarray(ids, dtype=np.int64)
    return score_windows(model, stream, stream_windows(len(stream), model.config.block_size), byte_lengths,
                         batch_size)


def score_text(model: GPT, tokenizer: Tokenizer, text: str, eot_id: int, batch_size: int = 16) -> Score:
    """Score a text as a document: its tokens are predicted from <|endoftext|> onwards, as in training."""
    ids = [eot_id, *tokenizer.encode(text).ids]
    if len(ids) < 2:
        raise ValueError("the text is empty: nothing to score")
    return score_ids(model, ids, token_byte_lengths(tokenizer), batch_size)


def score_shards(model: GPT, shard_paths: list[Path], byte_lengths: np.ndarray, max_tokens: int = 0,
                 batch_size: int = 16) -> Score:
    """Score token shards (each its own stream). With max_tokens > 0 and more tokens than that, score only
    max_tokens // block_size windows, evenly spaced over all shards (deterministic)."""
    block = model.config.block_size
    streams = [open_shard(path, vocab_size=model.config.vocab_size) for path in shard_paths]
    windows = [(i, w) for i, stream in enumerate(streams) for w in stream_windows(len(stream), block)]
    if not windows:
        raise InputError(f"{', '.join(map(str, shard_paths))}: no tokens to score")
    if max_tokens > 0 and len(windows) * block > max_tokens:
        keep = np.linspace(0, len(windows) - 1, num=max(1, max_tokens // block)).round().astype(int)
        windows = [windows[i] for i in np.unique(keep)]
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for i, window in windows:
        by_shard.setdefault(i, []).append(window)
    total = Score(0.0, 0, 0)
    for i, mine in by_shard.items():
        total += score_windows(model, streams[i], mine, byte_lengths, batch_size)
    return total


# --- the evaluate stage ------------------------------------------------------------------------------------

def score_text_file(model_dir: Path, text: Path) -> dict[str, Any]:
    """Score a UTF-8 file as one document: what `evaluate --text` prints. Writes nothing."""
    content = read_utf8(text)
    if not content:
        raise InputError(f"{text}: empty file, nothing to score")
    model, tokenizer = load_model_dir(model_dir, default_device())
    score = score_text(model, tokenizer, content, tokenizer.token_to_id(EOT))
    return {"loss": score.loss, "perplexity": score.perplexity, "bpb": score.bpb, "tokens": score.tokens,
            "bytes": score.bytes, "file": str(text)}


@dataclasses.dataclass(frozen=True)
class EvalPaths:
    model: Path  # the trained model folder
    tokens: Path  # token shards: the val split is scored
    checkpoints: Path  # the training's checkpoints, for the attention maps
    train_plots: Path  # the training's loss table (plots/train.csv)
    metrics: Path  # metrics/eval.json
    reports: Path  # reports/: samples.md, loss.png, attention/ and attention_evolution.png are replaced


def run_evaluation(cfg: EvaluateConfig, init_seed: int, paths: EvalPaths,
                   mlflow_cfg: MlflowConfig) -> dict[str, Any]:
    """Score the model on the val split, write metrics/eval.json and reports/, and add both to the MLflow run
    that trained the model (at `mlflow_cfg`'s tracking URI; a tracker that fails changes none of the outputs: what
    it did not take is reported at the end), the val bpb and loss linked to the run's LoggedModel and the val set,
    which may make it the registered model's champion (llm/model_registry.py). `init_seed` (train.seed) rebuilds
    the initial weights for the attention maps."""
    model, tokenizer = load_model_dir(paths.model, default_device())
    meta = read_meta(paths.tokens)
    meta.check_tokenizer(paths.tokens, paths.model / "tokenizer.json")
    if paths.train_plots.is_file():  # read again for loss.png: a damaged one is refused before any report is written
        read_history_csv(paths.train_plots)
    trained = read_model_run(paths.model)  # eval.json names the training's run whether or not MLflow answers now
    run = run_of_model(paths.model, mlflow_cfg, Job("evaluation", f"{paths.metrics}, {paths.reports}"))

    shards = meta.shard_paths(paths.tokens, "val")
    score = score_shards(model, shards, token_byte_lengths(tokenizer), cfg.max_tokens, cfg.batch_size)
    results = {"val_loss": score.loss, "val_perplexity": score.perplexity, "val_bpb": score.bpb,
               "val_tokens": score.tokens, "val_bytes": score.bytes}
    log.info("val: %d tokens (%s), loss %.4f, perplexity %.2f, %.4f bits per byte", score.tokens,
             "all" if score.tokens >= meta.splits["val"].tokens - len(shards) else "sampled windows",
             score.loss, score.perplexity, score.bpb)

    paths.reports.mkdir(parents=True, exist_ok=True)
    reports = write_reports(paths.reports, model, initial_model(model.config, init_seed), tokenizer, cfg,
                            tokenizer.token_to_id(EOT), paths.checkpoints, paths.train_plots)
    write_json_atomic(paths.metrics, {**results, "mlflow_run_id": trained.run_id if trained else None})
    log.info("wrote %s and %s/", paths.metrics, paths.reports)
    run.log_metrics({f"eval/{k}": v for k, v in results.items()})
    link = "the evaluation's link to the model" + (" and the registry step" if mlflow_cfg.registered_model else "")
    val = scored_val_set(val_dataset(paths.tokens, meta), cfg.max_tokens)
    run.call(link, evaluation_task(results, val, mlflow_cfg.registered_model))
    for report in reports:
        run.log_artifact(report, f"eval/{report.name}" if report.is_dir() else "eval")  # attention/ as a folder
    run.log_artifact(paths.metrics, "eval")
    run.finish()
    return results
