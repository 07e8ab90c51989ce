"""The exceptions that reach the user as a single line."""

from __future__ import annotations

import reprlib

# How much of a value a user gave is echoed in a message: enough to recognise it, never the
# whole of a huge or deeply shared one (a YAML alias bomb expands exponentially when printed).
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 4
_SHOWN.maxlevel = 2


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do.

    The CLI prints it as one line and exits with code 2, without a traceback. A message is cut
    to MAX characters, whatever value it quotes.
    """

    MAX = 2000

    def __init__(self, message: str = "") -> None:
        super().__init__(clipped(message, self.MAX))


class ConfigError(UserError):
    """A bad config value. The message speaks of config keys (`distill.mode`), since a
    worker reads config.json, not flags; the CLI names its flags instead where it has them."""

    def __init__(self, key: str, text: str) -> None:
        super().__init__(f"{key} {text}")
        self.key, self.text = key, text


class Stopped(Exception):
    """The run stopped on request (Ctrl-C, SIGTERM) at a step boundary, its checkpoint saved:
    not an error. The CLI exits with code 3. An Exception, not a KeyboardInterrupt: the stop was
    handled, and what was in progress is saved (`where` says where it stopped)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


class Requeue(Stopped):
    """Stopped on the requeue signal (run.requeue_signal, e.g. SLURM's warning before the time
    limit): the same, with exit code 4, which a job script reads as "requeue me"."""


# Exit codes of the `fastdeit` command (documented in docs/cli.md).
EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_REQUEUE = 4
EXIT_INTERRUPTED = 130


def differences(ours: object, theirs: object, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, our value, their value) for every leaf where two JSON-like values differ,
    so that an error line can say what differs instead of printing both whole."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs), key=str):
            out += differences(ours.get(key), theirs.get(key), f"{prefix}{key}.")
        return out
    return [] if ours == theirs else [(prefix.rstrip("."), ours, theirs)]


def shown(value: object) -> str:
    """A value as an error line quotes it: its repr, cut to a few dozen characters and a few
    items per level (reprlib: the whole repr is never built)."""
    return _SHOWN.repr(value)


def clipped(text: str, limit: int = 80) -> str:
    """A name or word a user gave, quoted as it is, cut to `limit` characters."""
    return text if len(text) <= limit else text[:limit - 3] + "..."
