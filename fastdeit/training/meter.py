"""Throughput of the training loop: images, seconds and the share spent waiting for data,
per epoch and per logging window. Time spent on something else (saving a checkpoint) is
paused out of both, so img/s counts training only."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class EpochStats:
    """What an epoch measured: images (all ranks), training seconds (checkpoints paused out),
    img/s and the share of those seconds spent waiting for data."""

    images: int
    seconds: float
    train_img_s: float
    data_wait: float


class Meter:
    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.running = False  # within an epoch
        self.t0 = self.tick = 0.0  # epoch start; end of the last step (or pause)
        self.asked = 0.0  # when the loop last asked the loader for a batch (`asking`)
        self.images = 0
        self.wait = 0.0
        self.paused_s = 0.0
        self._window(0.0)

    def start_epoch(self) -> None:
        now = self.clock()
        self.running = True
        self.t0 = self.tick = now
        self.images = 0
        self.wait = 0.0
        self.paused_s = 0.0
        self._window(now)

    def _window(self, now: float) -> None:
        self.w_t = now
        self.w_images = 0
        self.w_wait = 0.0
        self.w_paused = 0.0

    def asking(self) -> None:
        """The loop asks the loader for its next batch now: what it did since the step ended
        (logging's device sync, the stop vote, a hook) is not waiting for data."""
        self.asked = self.clock()

    def data_ready(self) -> None:
        """The loader handed over a batch: the time since the loop asked for it (else since the
        last step or pause ended) was waiting."""
        waited = self.clock() - max(self.tick, self.asked)
        self.wait += waited
        self.w_wait += waited

    def step_done(self, images: int) -> None:
        self.images += images
        self.w_images += images
        self.tick = self.clock()

    @contextmanager
    def paused(self) -> Iterator[None]:
        t = self.clock()
        try:
            yield
        finally:
            self.tick = self.clock()
            self.paused_s += self.tick - t
            self.w_paused += self.tick - t

    def window(self) -> tuple[float, float]:
        """(img/s, data-wait fraction) since the last window, up to the end of the last step;
        starts the next window."""
        dt = max(self.tick - self.w_t - self.w_paused, 1e-9)
        out = (self.w_images / dt, self.w_wait / dt)
        self._window(self.tick)
        return out

    def seconds(self) -> float:
        """Training seconds of the epoch so far (0 outside an epoch)."""
        return self.clock() - self.t0 - self.paused_s if self.running else 0.0

    def end_epoch(self) -> EpochStats:
        seconds = self.seconds()
        self.running = False
        return EpochStats(self.images, seconds, self.images / max(seconds, 1e-9), self.wait / max(seconds, 1e-9))
