"""The exceptions that reach the user as a single line."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do.

    The CLI prints it as one line and exits with code 2, without a traceback.
    """


class ConfigError(UserError):
    """A bad config value. The message speaks of config keys (`distill.mode`), since a
    worker reads config.json, not flags; the CLI names its flags instead where it has them."""

    def __init__(self, key: str, text: str) -> None:
        super().__init__(f"{key} {text}")
        self.key, self.text = key, text
