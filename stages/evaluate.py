import json
import logging
from pathlib import Path

import torch
import typer

from llm.data import read_meta
from llm.errors import InputError
from llm.evaluate import score_shards, score_text, token_byte_lengths
from llm.fileio import atomic_dir, write_json_atomic
from llm.model_io import load_model_dir
from llm.report import write_reports
from llm.tokenizer import EOT, file_sha256
from llm.tracking import ExistingRun
from llm.train import initial_model
from stages.cli import PARAMS, stage
from stages.params import load_params

log = logging.getLogger(__name__)


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None


def training_run(model: Path) -> ExistingRun | None:
    """The MLflow run the train stage opened for this model (models/final/mlflow_run.json), if any."""
    path = model / "mlflow_run.json"
    if not path.is_file():
        log.warning("%s not found: evaluation is not logged to MLflow", path)
        return None
    try:
        info = json.loads(path.read_text())
        return ExistingRun(info["tracking_uri"], info["run_id"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{path}: unreadable ({err})") from None


@stage
def evaluate(
    params: Path = PARAMS,
    model: Path = typer.Option(Path("models/final"), help="trained model folder"),
    tokens: Path = typer.Option(Path("data/tokens"), help="token shards: the val split is scored"),
    checkpoints: Path = typer.Option(Path("models/checkpoints"), help="checkpoints for the attention maps"),
    train_plots: Path = typer.Option(Path("plots/train.csv"), help="the training's loss table"),
    metrics: Path = typer.Option(Path("metrics/eval.json"), help="val loss, perplexity, bits per byte"),
    reports: Path = typer.Option(Path("reports"), help="samples.md and PNG figures (replaced whole)"),
    text: Path | None = typer.Option(None, help="score this UTF-8 file instead: print JSON, write nothing"),
) -> None:
    """Score the model on the whole val split, write samples and attention heatmaps, and log them all to
    the training's MLflow run. With --text FILE, score that file and print one JSON object."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if text is not None:
        content = read_text_file(text)
        if not content:
            raise InputError(f"{text}: empty file, nothing to score")
        net, tokenizer = load_model_dir(model, device)
        score = score_text(net, tokenizer, content, tokenizer.token_to_id(EOT))
        typer.echo(json.dumps({"loss": score.loss, "perplexity": score.perplexity, "bpb": score.bpb,
                               "tokens": score.tokens, "bytes": score.bytes, "file": str(text)}))
        return

    cfg = load_params(params)
    net, tokenizer = load_model_dir(model, device)
    meta = read_meta(tokens)
    if meta["tokenizer_sha256"] != file_sha256(model / "tokenizer.json"):
        raise InputError(f"{tokens}/meta.json: shards were made with another tokenizer than the model's "
                         f"({model}/tokenizer.json)")
    run = training_run(model)

    shards = [tokens / name for name in meta["splits"]["val"]["shards"]]
    score = score_shards(net, shards, token_byte_lengths(tokenizer), cfg.evaluate.max_tokens, cfg.evaluate.batch_size)
    results = {"val_loss": score.loss, "val_perplexity": score.perplexity, "val_bpb": score.bpb,
               "val_tokens": score.tokens, "val_bytes": score.bytes}
    log.info("val: %d tokens (%s), loss %.4f, perplexity %.2f, %.4f bits per byte", score.tokens,
             "all" if score.tokens >= meta["splits"]["val"]["tokens"] - len(shards) else "sampled windows",
             score.loss, score.perplexity, score.bpb)

    eot_id = tokenizer.token_to_id(EOT)
    initial = initial_model(net.config, cfg.train.seed)
    with atomic_dir(reports) as staging:
        write_reports(staging, net, initial, tokenizer, cfg.evaluate, eot_id, checkpoints, train_plots)
    write_json_atomic(metrics, {**results, "mlflow_run_id": run.run_id if run else None})
    log.info("wrote %s and %s/", metrics, reports)
    if run is not None:
        run.log_metrics({f"eval/{k}": v for k, v in results.items()})
        run.log_artifact(reports, "eval")
        run.log_artifact(metrics, "eval")
        log.info("logged to MLflow run %s at %s", run.run_id, run.uri)
