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

from fastdeit.errors import EXIT_REQUEUE, EXIT_STOPPED, Requeue, Stopped

EARLY = "stopped before its work began; whatever was finished before is on disk: run the same command again"


def _early(signum: int, frame: FrameType | None) -> None:
    raise (Requeue if signum == signal.SIGUSR1 else Stopped)(EARLY)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _early)
    try:
        from fastdeit.cli import main as cli_main

        cli_main()
    except Stopped as e:  # one that arrived outside a command's own guard (while importing, parsing)
        sys.stderr.write(f"{e}\n")
        sys.exit(EXIT_REQUEUE if isinstance(e, Requeue) else EXIT_STOPPED)


if __name__ == "__main__":  # python -m fastdeit.entry: the command as installed
    main()
