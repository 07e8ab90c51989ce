"""Stopping at a safe point, however the signal arrives.

A scheduler stops a job in one of three ways, and each must end the same way (the current
step finished, a checkpoint saved, exit code 3; 4 for a requeue):

- to every process of the job (SLURM's scancel, preemption and time limit; Ctrl-C in a
  terminal reaches the whole foreground group): the launcher, every rank and every loader
  worker receive it;
- to the launcher only (`docker stop`, Kubernetes: PID 1);
- to one rank.

So: loader workers never act on these signals (`quiet_worker`; they die with their parent
through a parent-death signal instead, so that not even `kill -9` of a rank leaves them
behind); a rank stops after the step on the first SIGINT/SIGTERM and at once on the second
(`StopSignal`); the launcher relays what it receives to its ranks as real-time signals
(`FORWARD_*`), which a rank takes as a request that never counts as "the second signal" — a
rank that also received the scheduler's own signal must not read the relayed copy as a
second Ctrl-C. The ranks agree on the step to stop after (dist.StopVote).

The requeue signal (run.requeue_signal, SIGUSR1 by default: SLURM's `--signal=USR1@120`
warns before the time limit) asks for the same stop with exit code 4, "requeue me".
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, NoReturn

from fastdeit.errors import EXIT_INTERRUPTED

STOP, REQUEUE = "stop", "requeue"
COUNTED = (signal.SIGINT, signal.SIGTERM)  # the second of these stops at once
# What a launcher sends its ranks: real-time signals are queued (two never merge into one) and
# no scheduler sends them.
FORWARD_STOP = signal.SIGRTMIN + 1
FORWARD_REQUEUE = signal.SIGRTMIN + 2
# Everything a scheduler or a terminal may send that a loader worker must not act on.
WORKER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
# What a scheduler stops a process with (SIGUSR1: the default requeue signal).
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1


def requeue_signal(name: str) -> signal.Signals | None:
    """run.requeue_signal as a signal: USR1, USR2, or none."""
    return None if name == "none" else signal.Signals[f"SIG{name}"]


class StopSignal:
    """Within the block, the first SIGINT or SIGTERM sets `requested` ("stop") and calls
    `notice`; the loop stops at its next safe point. A second one ends the process at once
    (exit 130). The requeue signal
    sets `requested` to "requeue"; the launcher's relayed requests set it too; neither counts
    as a second signal. Only the main thread can handle signals: elsewhere the block runs
    unchanged. `quiet`: nothing is said at the second signal either (a launcher's worker: the
    launcher speaks for its group)."""

    def __init__(self, notice: Callable[[str], None] = lambda reason: None, requeue: str = "USR1",
                 quiet: bool = False) -> None:
        self.notice = notice
        self.quiet = quiet
        self.requested: str | None = None
        self._seen = 0
        self._old: dict[int, object] = {}
        self._requeue = requeue_signal(requeue)

    def _request(self, reason: str) -> None:
        first = self.requested is None
        if self.requested != REQUEUE:  # a requeue request is never downgraded
            self.requested = reason
        if first:
            self.notice(reason)

    def _counted(self, signum: int, frame: FrameType | None) -> None:
        self._seen += 1
        if self._seen > 1:
            # At once, as kill -9 would (every file is written atomically; the soak shows a run
            # survives that anywhere), not by raising: a KeyboardInterrupt that lands in a
            # __del__ (a DataLoader shutting its workers down) is printed and then ignored.
            if not self.quiet:
                say("interrupted: stopped at once; the last checkpoint is kept (--resume continues from it)")
            os._exit(EXIT_INTERRUPTED)
        self._request(STOP)

    def _relayed(self, signum: int, frame: FrameType | None) -> None:
        self._request(REQUEUE if signum in (FORWARD_REQUEUE, self._requeue) else STOP)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: self._counted for sig in COUNTED}
            for sig in (FORWARD_STOP, FORWARD_REQUEUE, self._requeue):
                if sig is not None:
                    handlers[sig] = self._relayed
            self._old = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
            # A launcher starts its workers with these blocked (runtime/relay.py): what arrived while
            # this process started up is handled now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handlers)
        global _active
        self._outer, _active = _active, self
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        global _active
        _active = self._outer
        for sig, previous in self._old.items():
            # A request that arrives while the process ends (a launcher relaying a late signal,
            # SLURM's warning) must not kill it: their default action is to terminate.
            late = sig not in COUNTED and previous in (signal.SIG_DFL, None)
            signal.signal(sig, signal.SIG_IGN if late else previous)
        self._old = {}


_active: StopSignal | None = None  # the innermost watch of this process


def requested() -> str | None:
    """Whether a stop was asked for ("stop", "requeue" or None), for work that checks between
    its pieces (cache shards, prepared shards) inside a command's StopSignal block."""
    return _active.requested if _active is not None else None


def say(text: str) -> None:
    """A line on stderr from a signal handler: one write(2) call, since a handler may run in
    the middle of a rich Console's own print (which is not reentrant)."""
    with contextlib.suppress(OSError):
        os.write(2, f"{text}\n".encode(errors="replace"))


def stop_notice(console: Any) -> Callable[[str], None]:
    """What a training process says when a stop is asked for (nothing where `console`, a
    rich Console, is quiet: ranks other than 0)."""
    def notice(reason: str) -> None:
        if not getattr(console, "quiet", False):
            say(f"stopping after this step and saving a checkpoint{' (requeue)' if reason == REQUEUE else ''} "
                f"(Ctrl-C again to stop at once)")
    return notice


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere nothing),
    so that a worker never outlives a killed rank."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request was made
        os._exit(1)


def quiet_worker(*_: object) -> None:
    """For a loader worker process (a DataLoader's worker_init_fn, a process pool's
    initializer): leave stop signals to the process that owns the run, die with it."""
    die_with_parent()
    if threading.current_thread() is threading.main_thread():
        for sig in WORKER_IGNORES:
            signal.signal(sig, signal.SIG_IGN)


@contextmanager
def workers_start_quiet() -> Iterator[None]:
    """Start worker processes within this block: the stop signals are blocked while they are
    made, so that a worker inherits them blocked (a pending signal stays pending in it for
    good, whatever start method made it) and never dies of one before its own start-up code
    runs; this process receives what arrived once the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORES)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --- the end of the work --------------------------------------------------------------------
# A job is often signalled just as it finishes (its time limit, a scancel of the whole array)
# while torch, DALI and CUDA tear down, which can take seconds. The work is over by then: the
# process must end with the exit code its work chose, never by the signal (a finished run
# reported killed; a rank's -15 turned by torchrun into a failed group).


def ignore_stops_at_exit() -> None:
    """After the atexit callbacks registered later than this (torch's, DALI's), Python puts
    the default handlers back before modules are torn down: stops are ignored from then on."""
    atexit.register(lambda: [signal.signal(sig, signal.SIG_IGN) for sig in STOPS])


def exit_after_work(code: int) -> NoReturn:
    """The work is over: exit with `code`; a stop from here on ends the process at once with
    `code` (a hanging teardown still yields to it), never with the signal's own death."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away, a closed stream
            stream.flush()  # os._exit skips Python's buffers
    for sig in STOPS:
        signal.signal(sig, lambda signum, frame: os._exit(code))
    sys.exit(code)
