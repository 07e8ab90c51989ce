"""The `fastdeit` command's entry point: stop signals are taken from the first instant.

Importing torch and building a run take seconds (minutes for a first scan of a large tree)
before training watches for stops (signals.StopSignal). A stop that arrives in that time has
nothing to save: it ends the command at once with the exit code and the line of any other stop
(3, or 4 for the requeue signal), instead of the signal's own death. Only this module and
fastdeit.errors are imported before the handlers are in place.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from fastdeit.errors import EXIT_REQUEUE, EXIT_STOPPED

EARLY = "stopped; what was finished is on disk (nothing was in progress to save): run the same command again"


class EarlyStop(BaseException):
    """A stop while the command starts. A BaseException, as KeyboardInterrupt is: it may arrive
    inside any import or library call, and code that catches Exception must let it through (a
    library that swallowed it mid-import and imported again failed with an ImportError)."""

    def __init__(self, requeue: bool) -> None:
        super().__init__(EARLY)
        self.requeue = requeue


def _early(signum: int, frame: FrameType | None) -> None:
    raise EarlyStop(requeue=signum == signal.SIGUSR1)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _early)
    try:
        from fastdeit.cli import main as cli_main

        cli_main()
    except EarlyStop as e:
        sys.stderr.write(f"{EARLY}\n")
        sys.exit(EXIT_REQUEUE if e.requeue else EXIT_STOPPED)


if __name__ == "__main__":  # python -m fastdeit.entry: the command as installed
    main()
