"""The one Typer app every stage registers on, and how errors become exit codes."""

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click
import typer

from llm.errors import InputError, Interrupted

app = typer.Typer(
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
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if isinstance(param, click.Option) and param.is_flag:
            options.append(param.opts[0] if value else param.secondary_opts[0])
        elif isinstance(param, click.Option) and value is not None:
            options += [param.opts[0], str(value)]
    return [sys.executable, "-m", "stages", ctx.info_name, *options]


def stage(fn: Callable) -> Callable:
    """Register `fn` as a command. An InputError becomes one line on stderr and exit code 2; SIGINT and
    SIGTERM (Interrupted, KeyboardInterrupt) one line and 130 or 143 (said by rank 0 only, in a
    distributed run)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as err:
            if os.environ.get("RANK", "0") == "0":
                typer.echo(f"interrupted: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: stopped by SIGINT", err=True)
            raise typer.Exit(130) from None

    return app.command(name=fn.__name__.replace("_", "-"))(run)
