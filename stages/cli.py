"""The one Typer app every stage registers on, and how errors become exit codes."""

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import click
import typer
from typer._click.exceptions import UsageError  # typer (pinned) parses with its own copy of click

from llm.errors import InputError, Interrupted


class OneLineUsageErrors(typer.core.TyperGroup):
    """The group of commands. A command line that cannot be parsed (a value of the wrong type or out of range, an
    unknown or a missing option) is bad input like any other: one line on stderr naming the option, exit code 2,
    instead of click's usage text and framed message."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except UsageError as err:
            typer.echo(f"error: {' '.join(err.format_message().split())}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="GPT from scratch: the pipeline's stages. Each reads params.yaml (--params) and its inputs.",
)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file to read", dir_okay=False)


def command_line(ctx: typer.Context) -> list[str]:
    """The command being run, as a new process would run it: `python -m stages NAME` with every option's value
    (the defaults made explicit), read from the command's own option list, so none is listed twice."""
    options = []
    for param in ctx.command.params:  # typer's own copy of click: its classes are not click's, ask the kind
        value = ctx.params[param.name]
        if param.param_type_name != "option" or value is None:
            continue
        if getattr(param, "is_flag", False):
            options.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            options += [param.opts[0], str(value)]
    return [sys.executable, "-m", "stages", ctx.info_name, *options]


class Terminated(KeyboardInterrupt):
    """SIGTERM (what DVC, Slurm and Kubernetes send), raised where the command is as Python raises
    KeyboardInterrupt for Ctrl-C, and a kind of it: `with` blocks unwind (a temp folder is removed, a pool's
    workers stopped), what handles Ctrl-C handles this too, and no `except Exception` swallows it."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While entered (in the main thread), the first SIGTERM raises Terminated; a repeated one is ignored, so
    that the unwinding the first started is not cut short. The training loop enters its own handler inside
    this one (llm/signals.py StopSignals: a checkpoint first), which puts this one back when it leaves."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = False

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        if not received:
            received = True
            raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def stage(fn: Callable) -> Callable:
    """Register `fn` as a command. An InputError becomes one line on stderr and exit code 2. SIGINT and SIGTERM
    unwind the command wherever it is (its temp output removed, its workers stopped), then become one line and
    130 or 143; the train stage checkpoints first (Interrupted; said by rank 0 only, in a distributed run)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
        try:
            with sigterm_interrupts():
                return fn(*args, **kwargs)
        except InputError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except (Interrupted, KeyboardInterrupt) as err:  # KeyboardInterrupt: Ctrl-C, or SIGTERM (Terminated)
            if isinstance(err, Interrupted):
                exit_code, message = err.exit_code, str(err)
            else:
                signum = err.signum if isinstance(err, Terminated) else signal.SIGINT
                exit_code, message = 128 + signum, f"stopped by {signal.Signals(signum).name}"
            if os.environ.get("RANK", "0") == "0":
                typer.echo(f"interrupted: {message}", err=True)
            raise typer.Exit(exit_code) from None

    return app.command(name=fn.__name__.replace("_", "-"))(run)
