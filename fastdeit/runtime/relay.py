"""The launcher's side of a stop (runtime/signals.py says how a stop arrives and ends).

torchrun's agent, left to itself, takes SIGINT/SIGTERM in the launcher as its own death: it
sends the workers SIGTERM, SIGKILLs them 30 s later and raises, so a preempted worker group
reported a crash and saved nothing. Here the agent runs in a thread of the launcher (torchrun
installs its handlers only from the main thread), and the main thread relays what the
launcher receives to the ranks as requests they take at their next step boundary. The agent
thread blocks those signals, and the workers it starts inherit the mask: a signal that
reaches a worker while it is still importing torch waits for its handler instead of killing it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from fastdeit.runtime.signals import COUNTED, FORWARD_REQUEUE, FORWARD_STOP, REQUEUE, STOP, requeue_signal, say

GRACE_S = 10.0  # after "stop at once": how long the ranks get to leave before SIGKILL
POLL_S = 0.2  # how often the launcher looks at its workers while the group runs


class Relay:
    """Run torchrun's agent and relay stop requests to the ranks it starts: the first
    SIGINT/SIGTERM as "stop after this step", the requeue signal as "requeue", the second
    SIGINT/SIGTERM as "at once" (each rank gets SIGINT and SIGTERM, which its StopSignal
    counts as two; SIGKILL to its process group after GRACE_S)."""

    def __init__(self, requeue: str) -> None:
        self.requeue = requeue_signal(requeue)
        self.requested: str | None = None
        self.at_once: float | None = None  # when the second signal came
        self.seen = 0
        self.sent: set[tuple[int, str]] = set()

    def run_agent(self, args: list[str]) -> None:
        """torchrun with these arguments, to its end; its exception, if any, is raised here."""
        from torch.distributed.run import parse_args, run

        if threading.current_thread() is not threading.main_thread():
            run(parse_args(args))
            return
        outcome: dict[str, BaseException] = {}
        blocked = {*COUNTED, FORWARD_STOP, FORWARD_REQUEUE, *([self.requeue] if self.requeue else [])}

        def agent() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
            try:
                run(parse_args(args))
            except BaseException as e:  # handed to the main thread
                outcome["error"] = e

        handlers = {sig: self._counted for sig in COUNTED}
        if self.requeue:
            handlers[self.requeue] = self._requeue
        old = {sig: signal.signal(sig, h) for sig, h in handlers.items()}
        thread = threading.Thread(target=agent, name="torchrun-agent", daemon=True)
        try:
            thread.start()
            while thread.is_alive():
                thread.join(POLL_S)
                self.forward()  # ranks that started (or restarted) after the request get it too
                if self.at_once is not None and time.monotonic() - self.at_once > GRACE_S:
                    self.signal_ranks(signal.SIGKILL, group=True)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        if "error" in outcome:
            raise outcome["error"]

    def _counted(self, signum: int, frame: FrameType | None) -> None:
        self.seen += 1
        if self.seen == 1:
            say("stopping the workers after this step (Ctrl-C again to stop at once)")
            self._ask(STOP)
        elif self.at_once is None:
            say("stopping the workers at once")
            self.at_once = time.monotonic()
            self.signal_ranks(signal.SIGINT)
            self.signal_ranks(signal.SIGTERM)

    def _requeue(self, signum: int, frame: FrameType | None) -> None:
        self._ask(REQUEUE)

    def _ask(self, reason: str) -> None:
        if self.requested != REQUEUE:
            self.requested = reason
        self.forward()

    def forward(self) -> None:
        """The request to every rank that has not had it yet."""
        if self.requested is None:
            return
        sig = FORWARD_REQUEUE if self.requested == REQUEUE else FORWARD_STOP
        for pid in ranks():
            if (pid, self.requested) not in self.sent:
                self.sent.add((pid, self.requested))
                _kill(pid, sig)

    def signal_ranks(self, sig: int, group: bool = False) -> None:
        for pid in ranks():
            _kill(pid, sig, group)


def _kill(pid: int, sig: int, group: bool = False) -> None:
    # torchrun starts each rank in a session of its own: its group is its loader workers too.
    with contextlib.suppress(ProcessLookupError, PermissionError):  # it has just ended
        (os.killpg if group else os.kill)(pid, sig)


def ranks() -> list[int]:
    """This process's children that are fastdeit workers (torchrun's agent starts them)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me and b"fastdeit.runtime.launch" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # gone while we looked
    return found
