"""The `fastdeit` command's entry point: stop signals are taken from the first instant.

Importing torch and building a run take seconds (minutes for a first scan of a large tree)
before training watches for stops (signals.StopSignal). A stop that arrives in that time has
nothing to save: it ends the command at once with the exit code and the line of any other stop
(3, or 4 for the requeue signal), instead of the signal's own death. Only this module,
fastdeit.errors and fastdeit.runtime.signals (the standard library only) are imported before the
handlers are in place.

The same holds at the other end: once the command's work is over, a stop that arrives while
the process ends (a scheduler signalling a job that has just finished, while torch and DALI
tear down) ends it with the exit code the command chose, never by the signal: a finished run
is not reported killed.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from fastdeit.errors import EXIT_REQUEUE, EXIT_STOPPED
from fastdeit.runtime.signals import exit_after_work, ignore_stops_at_exit

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
    ignore_stops_at_exit()  # registered before torch and DALI register theirs: it runs last
    try:
        from fastdeit.cli.commands import run_app

        run_app()
        code = 0
    except EarlyStop as e:
        sys.stderr.write(f"{EARLY}\n")
        code = EXIT_REQUEUE if e.requeue else EXIT_STOPPED
    except SystemExit as e:  # click ends every command this way
        if isinstance(e.code, str):
            sys.stderr.write(f"{e.code}\n")
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    exit_after_work(code)


if __name__ == "__main__":  # python -m fastdeit.cli.entry: the command as installed
    main()
