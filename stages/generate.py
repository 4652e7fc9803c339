import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from llm.config import EOT, check_field
from llm.configs.evaluate import MAX_NEW_TOKENS, EvaluateConfig, check_sampling
from llm.errors import InputError
from stages.cli import stage
from stages.params import load_params

if TYPE_CHECKING:
    from llm.generate import Sampling


def sampling_defaults(params: Path | None) -> EvaluateConfig:
    """The evaluate section of the params file (params.yaml when present), else the built-in defaults."""
    if params is None:
        params = Path("params.yaml")
        if not params.is_file():
            return EvaluateConfig()
    return load_params(params, evaluate=EvaluateConfig).evaluate


def flag(param: str) -> str:
    """The command-line flag that sets a sampling param: top_p is --top-p."""
    return "--" + param.replace("_", "-")


def resolve_sampling(params: Path | None, max_new_tokens: int | None, temperature: float | None, top_k: int | None,
                     top_p: float | None, seed: int | None) -> "Sampling":
    """The sampling flags of generate and chat, each checked as its param is (an error names the flag), those
    not given from the evaluate section of the params file."""
    from llm.generate import Sampling

    defaults = sampling_defaults(params)
    sampling = Sampling(max_new_tokens=defaults.max_new_tokens if max_new_tokens is None else max_new_tokens,
                        temperature=defaults.temperature if temperature is None else temperature,
                        top_k=defaults.top_k if top_k is None else top_k,
                        top_p=defaults.top_p if top_p is None else top_p, seed=seed)
    check_sampling(sampling.temperature, sampling.top_k, sampling.top_p, key=flag)
    check_field(EvaluateConfig, "max_new_tokens", sampling.max_new_tokens, flag("max_new_tokens"))
    if seed is not None:
        check_field(EvaluateConfig, "seed", seed, flag("seed"))
    return sampling


def downloaded(params: Path | None, uri: str, dst: Path) -> Path:
    """The model folder of MLflow model `uri`, from the tracking URI of the params file's mlflow section (params.yaml
    when present, else the default one)."""
    from llm.configs.mlflow import MlflowConfig
    from llm.model_registry import download_model

    if params is None and not Path("params.yaml").is_file():
        return download_model(uri, MlflowConfig(), dst)
    return download_model(uri, load_params(params or Path("params.yaml"), mlflow=MlflowConfig).mlflow, dst)


def check_utf8(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # bytes of the command line that are not UTF-8 (Python escapes them)
        raise InputError(f"{name}: not valid UTF-8 (character {err.start})") from None


@stage
def generate(
    params: Path | None = typer.Option(None, "--params", help="sampling defaults from its evaluate section "
                                       "[default: params.yaml when present]", dir_okay=False),
    model_dir: Path = typer.Option(Path("models/final"), "--model", help="trained model folder, or a model in MLflow: "
                                   "models:/NAME@champion (downloaded from mlflow.tracking_uri)"),
    prompt: str = typer.Option("", help="text to continue; empty starts a new document"),
    max_new_tokens: int | None = typer.Option(None, help=f"stop after this many tokens (1 to {MAX_NEW_TOKENS:,}) "
                                              "or <|endoftext|> [default: evaluate.max_new_tokens]"),
    temperature: float | None = typer.Option(None, help="0 is greedy [default: evaluate.temperature]"),
    top_k: int | None = typer.Option(None, help="sample among the k most likely tokens; 0 turns it off "
                                     "[default: evaluate.top_k]"),
    top_p: float | None = typer.Option(None, help="nucleus: the smallest set of tokens holding this much "
                                       "probability, in (0, 1]; 1.0 turns it off [default: evaluate.top_p]"),
    seed: int | None = typer.Option(None, help="the same seed gives the same text [default: a random one]"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute the whole context every token (slow)"),
) -> None:
    """Continue a prompt, streaming the new text to stdout as it is produced (the prompt is not printed)."""
    from llm.distributed import default_device
    from llm.generate import generate as generate_ids
    from llm.generate import prompt_ids, stream_text
    from llm.model_io import load_model_dir
    from llm.model_registry import is_model_uri

    sampling = resolve_sampling(params, max_new_tokens, temperature, top_k, top_p, seed)
    check_utf8("--prompt", prompt)
    if is_model_uri(model_dir):
        with tempfile.TemporaryDirectory(prefix="llm-generate-") as tmp:
            model, tokenizer = load_model_dir(downloaded(params, str(model_dir), Path(tmp)), default_device())
    else:
        model, tokenizer = load_model_dir(model_dir, default_device())
    eot_id = tokenizer.token_to_id(EOT)
    ids = generate_ids(model, prompt_ids(tokenizer, prompt, eot_id), sampling.max_new_tokens,
                       temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                       seed=sampling.seed, eot_id=eot_id, use_cache=not no_cache)
    for piece in stream_text(tokenizer, ids):
        sys.stdout.write(piece)
        sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
