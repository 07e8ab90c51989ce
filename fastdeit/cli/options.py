"""The commands' typer parameters, made from the one option table (fastdeit/config/flags.py)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer

from fastdeit.config.flags import COMMANDS, OPTIONS, Given, check_choices, help_of


def options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command function `fn(given, **own)` the table's options of `command` as typer
    parameters (after its own, e.g. arguments); choices are checked before `fn` runs."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "given"]
        table = COMMANDS[command]

        def run(**values: Any) -> Any:
            mine = {p.name: values.pop(p.name) for p in own}
            check_choices(values)
            return fn(Given(**values), **mine)

        # a bool without declared flags gets typer's --name/--no-name pair
        params = own + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=OPTIONS[name].type,
                                          default=typer.Option(use.default, *OPTIONS[name].flags,
                                                               help=help_of(name, use)))
                        for name, use in table.items()]
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__name__ = fn.__name__
        run.__doc__ = fn.__doc__
        run.__module__ = fn.__module__
        run.options_of = command  # type: ignore[attr-defined]  # the guard names keys by its flags
        return run

    return wrap
