"""What every `fastdeit` command shares: the typer app, the error console, the guard that
turns bad input into one line and exit code 2."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

try:  # typer vendors click since 0.2x; before, it is click itself
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:
    from click import UsageError as ClickUsageError

from fastdeit import __version__
from fastdeit.config.flags import key_flags
from fastdeit.config.schema import choices
from fastdeit.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_REQUEUE,
    EXIT_STOPPED,
    ConfigError,
    Requeue,
    Stopped,
    UserError,
)

# Log lines stay whole (paths are greppable), and text is never read as markup: a path or a
# shape in square brackets is printed as it is.
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


class _OneLineUsageErrors(TyperGroup):
    """A flag that does not parse (`--epochs abc`), an unknown or missing one, an unknown
    command, an unknown option before any command (`fastdeit --bogus`): one line and exit code
    2, as any bad input, instead of click's boxed usage."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except ClickUsageError as e:
            _usage_error(e, ctx.command_path)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClickUsageError as e:
            _usage_error(e, f"{ctx.command_path} {ctx.invoked_subcommand or ''}")


def _usage_error(e: ClickUsageError, path: str) -> NoReturn:
    path = e.ctx.command_path if e.ctx is not None else path
    err.print(Text.assemble(("error:", "red"), " ", f"{e.format_message()} (see {path.strip()} --help)"))
    raise typer.Exit(EXIT_BAD_INPUT) from None


app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train DeiT students, with distillation through the distillation token, fast.")


def _print_version(asked: bool) -> None:
    if asked:
        print(f"fastdeit {__version__}")
        raise typer.Exit()


@app.callback()
def _before_any_command(
    version: bool = typer.Option(False, "--version", help="Print fastdeit's version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Options of `fastdeit` itself, before any command."""


def _one_of(typ: Any) -> str:
    return " | ".join(choices(typ))


def flagged(text: str, flags: dict[str, str], overrides: list[str], keep: tuple[str, ...] = ()) -> str:
    """An error line with config keys shown as this command's flags ({key: flag}); keys set
    with --set, and those in `keep`, stay keys."""
    if text.startswith("--config "):  # a file's fault is named by the file's own keys
        return text
    given = {item.split("=", 1)[0] for item in overrides} | set(keep)
    for key, flag in flags.items():
        if key not in given:
            text = re.sub(rf"(?<![\w.]){re.escape(key)}(?!\w)", flag, text)
    return text


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command's body, guarded: bad input (UserError) becomes one line and exit code 2;
    Ctrl-C (outside training, which handles its own) says what is kept, exit code 130."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            name = getattr(fn, "options_of", None)  # a command built from the option table
            flags, given = (key_flags(name), key_flags(name, kwargs)) if name else ({}, {})
            # the faulty key is named by its flag only where the flag was given (not from the
            # recipe or a --config file); a key in the remedy is always named by its flag
            keep = (e.key,) if isinstance(e, ConfigError) and e.key not in given else ()
            text = flagged(str(e), flags, kwargs.get("overrides") or [], keep)
            err.print(Text.assemble(("error:", "red"), " ", text))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Stopped as e:  # a requeue stop exits with its own code
            err.print(str(e), markup=False)
            raise typer.Exit(EXIT_REQUEUE if isinstance(e, Requeue) else EXIT_STOPPED) from None
        except KeyboardInterrupt:
            err.print("interrupted: what was finished is on disk; the same command resumes where it can")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return guarded
