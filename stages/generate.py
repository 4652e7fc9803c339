import sys
from pathlib import Path

import torch
import typer
from tokenizers.decoders import DecodeStream

from llm.config import EvaluateConfig
from llm.errors import InputError
from llm.generate import generate as generate_ids
from llm.generate import prompt_ids
from llm.model_io import load_model_dir
from llm.tokenizer import EOT
from stages.cli import stage
from stages.params import load_params


def sampling_defaults(params: Path | None) -> EvaluateConfig:
    """The evaluate section of the params file (params.yaml when present), else the built-in defaults."""
    if params is None:
        params = Path("params.yaml")
        if not params.is_file():
            return EvaluateConfig()
    return load_params(params).evaluate


@stage
def generate(
    params: Path | None = typer.Option(None, "--params", help="sampling defaults from its evaluate section "
                                       "[default: params.yaml when present]", dir_okay=False),
    model: Path = typer.Option(Path("models/final"), help="trained model folder"),
    prompt: str = typer.Option("", help="text to continue; empty starts a new document"),
    max_new_tokens: int | None = typer.Option(None, min=1, help="stop after this many tokens or <|endoftext|> "
                                              "[default: evaluate.max_new_tokens]"),
    temperature: float | None = typer.Option(None, min=0.0, help="0 is greedy [default: evaluate.temperature]"),
    top_k: int | None = typer.Option(None, min=0, help="sample among the k most likely tokens; 0 turns it off "
                                     "[default: evaluate.top_k]"),
    top_p: float | None = typer.Option(None, min=0.0, max=1.0, help="nucleus: the smallest set of tokens holding "
                                       "this much probability; 1.0 turns it off [default: evaluate.top_p]"),
    seed: int | None = typer.Option(None, help="the same seed gives the same text [default: a random one]"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute the whole context every token (slow)"),
) -> None:
    """Continue a prompt, streaming the new text to stdout as it is produced (the prompt is not printed)."""
    defaults = sampling_defaults(params)
    max_new_tokens = defaults.max_new_tokens if max_new_tokens is None else max_new_tokens
    temperature = defaults.temperature if temperature is None else temperature
    top_k = defaults.top_k if top_k is None else top_k
    top_p = defaults.top_p if top_p is None else top_p
    if top_p == 0.0:
        raise InputError("--top-p: must be in (0, 1], got 0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, tokenizer = load_model_dir(model, device)
    eot_id = tokenizer.token_to_id(EOT)
    stream = DecodeStream(skip_special_tokens=True)
    ids, printed = [], []
    for token in generate_ids(net, prompt_ids(tokenizer, prompt, eot_id), max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, eot_id=eot_id, use_cache=not no_cache):
        ids.append(token)
        piece = stream.step(tokenizer, token)  # None while a character's bytes are incomplete
        if piece:
            printed.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    # Bytes of a character the generation stopped inside of are still owed: print them as decode would.
    sys.stdout.write(tokenizer.decode(ids, skip_special_tokens=True).removeprefix("".join(printed)))
    if sys.stdout.isatty():
        sys.stdout.write("\n")
