import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from llm.configs.evaluate import MAX_NEW_TOKENS
from stages.cli import stage
from stages.generate import check_utf8, resolve_sampling

if TYPE_CHECKING:
    from llm.chatbot import ChatSession

HELP = "type a message and press Enter; /reset starts over, /quit (or Ctrl-D) leaves"


@stage
def chat(
    params: Path | None = typer.Option(None, "--params", help="sampling defaults from its evaluate section "
                                       "[default: params.yaml when present]", dir_okay=False),
    model_dir: Path = typer.Option(Path("models/sft"), "--model", help="instruction-tuned model folder"),
    prompt: str | None = typer.Option(None, help="ask this one question, print only the answer, and exit"),
    system: str | None = typer.Option(None, help="a system message that starts the conversation"),
    max_new_tokens: int | None = typer.Option(None, help=f"the longest answer in tokens (1 to {MAX_NEW_TOKENS:,}) "
                                              "[default: evaluate.max_new_tokens]"),
    temperature: float | None = typer.Option(None, help="0 is greedy [default: evaluate.temperature]"),
    top_k: int | None = typer.Option(None, help="0 turns it off [default: evaluate.top_k]"),
    top_p: float | None = typer.Option(None, help="in (0, 1]; 1.0 turns it off [default: evaluate.top_p]"),
    seed: int | None = typer.Option(None, help="answer i samples with seed + i [default: a random one]"),
) -> None:
    """Talk with the instruction-tuned model: answers stream as they are sampled; the conversation is kept within
    the context, its oldest turns left out first. With --prompt, one question and its answer on stdout."""
    from llm.chat import ChatTokens
    from llm.chatbot import ChatSession
    from llm.distributed import default_device
    from llm.errors import InputError
    from llm.model_io import load_model_dir

    sampling = resolve_sampling(params, max_new_tokens, temperature, top_k, top_p, seed)
    for name, text in (("--prompt", prompt), ("--system", system)):
        if text is not None:
            check_utf8(name, text)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: no tuned model here; make one with `dvc repro sft` (or `python -m stages "
                         "sft`), or point --model at a model folder")
    model, tokenizer = load_model_dir(model_dir, default_device())
    session = ChatSession(model, tokenizer, ChatTokens.from_tokenizer(tokenizer, model_dir / "tokenizer.json"),
                          sampling, system)
    if prompt is not None:
        answer(session, prompt)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(HELP, err=True)
    while True:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            typer.echo("(the conversation starts over)", err=True)
        elif text.strip():
            answer(session, text)


def answer(session: "ChatSession", text: str) -> None:
    """Stream the model's answer to `text` to stdout, then a newline."""
    for piece in session.reply(text):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
