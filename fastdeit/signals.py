"""Stopping at a safe point: Ctrl-C and SIGTERM ask the loop to stop after the current step."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType


class StopSignal:
    """Within the block, the first Ctrl-C or SIGTERM (what a scheduler sends before it
    preempts, and what torchrun forwards to its workers) sets `requested` and calls `notice`;
    the loop stops at its next safe point. A second one raises KeyboardInterrupt. Only the
    main thread can handle signals: elsewhere the block runs unchanged."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, notice: Callable[[], None] = lambda: None) -> None:
        self.notice = notice
        self.requested = False
        self._seen = 0
        self._old: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self._seen += 1
        if self._seen > 1:
            raise KeyboardInterrupt
        self.requested = True
        self.notice()

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        for sig, previous in self._old.items():
            signal.signal(sig, previous)
        self._old = {}
