"""The DALI train graph executing the augmentation plan, and its loader.

The plan reaches the graph through fn.external_source, one step's shard per call: file bytes,
crop boxes (decoded as a region of interest), flips and the RandAugment parameters. DALI's own
RNG is never used, so a plan gives the same batch as the reference pipeline up to decoder and
resampler differences (see tests/test_pipeline_dali.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastdeit.data.folder import ImageIndex
from fastdeit.data.plan import BatchPlan, PlanSpec, make_plan, steps_per_epoch
from fastdeit.pipelines.batch import LoadedBatch, substitutes
from fastdeit.pipelines.dali.common import available, interp, to_torch
from fastdeit.runtime.signals import quiet_worker, workers_start_quiet

try:  # DALI is a Linux-only dependency; everything else works without it.
    from nvidia.dali import fn, pipeline_def, types

    from fastdeit.pipelines.dali.augment import apply_layer, apply_three, jitter_params, layer_params
    from fastdeit.pipelines.dali.crop import SRC_NAMES, simple_crop, src_params
    from fastdeit.pipelines.dali.decode import FAILED, dali_format, dali_unreadable, decoder_options
except ImportError:  # pragma: no cover - exercised only where DALI is absent
    fn = None


_quieted: int | None = None


def _quiet_reader(owner: int) -> None:
    """In one of DALI's read worker processes (not `owner`, the training process), once: leave
    stop signals to the run and die with it (runtime/signals.py). DALI offers no worker start hook:
    this runs at the worker's first batch, and the signals stay blocked until then."""
    global _quieted
    if os.getpid() != owner and _quieted != os.getpid():
        quiet_worker()
        _quieted = os.getpid()


@dataclass(frozen=True)
class PlanSource:
    """The fn.external_source callback of a train pipeline: a pure function of the iteration,
    which is the batch `iteration` positions after (epoch, start) of this rank's shard, running
    on into the following epochs (one pipeline serves a whole run) and stopping before epoch
    `end` (None: never). It computes the batch's plan and reads its files, so with
    parallel=True DALI runs it in worker processes, ahead of and away from the training thread.
    Its outputs are named (`names`): the files, crop starts and shapes, flips, a tag per row
    (epoch, step, whether the row's file was replaced), the simple random crop's geometry
    where it is on, then the parameters of each
    RandAugment layer, then 3-Augment's (its op and blur radius, and its three colour ops as
    layers)."""

    index: ImageIndex
    spec: PlanSpec
    rank: int = 0
    world: int = 1
    skip: frozenset[int] = frozenset()
    epoch: int = 0
    start: int = 0
    end: int | None = None
    owner: int = field(default_factory=os.getpid)  # the training process (pickled to spawned workers)

    @property
    def layers(self) -> int:
        ra = self.spec.rand_augment
        return ra.num_layers if ra is not None else 0

    @property
    def names(self) -> tuple[str, ...]:
        """The outputs, in the order DALI's external source carries them to the graph."""
        three = ("three.op", "three.radius", *(n for k in range(3) for n in _layer(k, "jitter"))) \
            if self.spec.aug.three_augment else ()
        src = SRC_NAMES if self.spec.aug.simple_crop else ()
        return ("files", "start", "shape", "flip", "tag", *src, *(n for k in range(self.layers) for n in _layer(k)),
                *three)

    def position(self, iteration: int) -> tuple[int, int]:
        """(epoch, step) of the batch `iteration` batches after this source's first."""
        epoch, step = divmod(self.start + iteration, steps_per_epoch(self.spec, len(self.index)))
        return self.epoch + epoch, step

    def plan(self, epoch: int, step: int) -> BatchPlan:
        return make_plan(self.spec, self.index.sizes, epoch, step).shard(self.rank, self.world)

    def __call__(self, info) -> tuple:
        _quiet_reader(self.owner)
        epoch, step = self.position(info.iteration)
        if self.end is not None and epoch >= self.end:
            raise StopIteration
        plan = self.plan(epoch, step)
        data, refused = {}, set()
        for i in dict.fromkeys(int(i) for i in plan.index if i not in self.skip):
            data[i] = self.index.read(i)
            if not dali_format(data[i]):  # a format DALI does not read: replaced like an unreadable file
                refused.add(i)
        bad = np.array([i in self.skip or i in refused for i in plan.index])
        take = substitutes(plan, bad, self.index)
        files = [data[int(i)] for i in plan.index[take]]
        crop = plan.crop[take]
        tag = np.stack([np.full(len(plan), plan.epoch), np.full(len(plan), plan.step), bad], 1).astype(np.int64)
        out = {"files": files, "start": crop[:, :2].copy(), "shape": crop[:, 2:].copy(),
               "flip": plan.flip[take].astype(np.int32), "tag": tag}
        if self.spec.aug.simple_crop:
            out.update(src_params(self.index.sizes[plan.index[take]], plan.src[take], self.spec.img_size))
        for k in range(self.layers):
            out.update(zip(_layer(k), layer_params(self.spec.ra_ops, plan.ra_op[take, k], plan.ra_arg[take, k],
                                                   self.spec.img_size)))
        if self.spec.aug.three_augment:
            out["three.op"] = plan.three_op[take].astype(np.int32)
            out["three.radius"] = plan.blur[take].astype(np.float32)
            for k in range(3):
                out.update(zip(_layer(k, "jitter"), jitter_params(plan.jitter[take], plan.jitter_order[take], k,
                                                                  self.spec.img_size)))
        return tuple(out[name] for name in self.names)


def _layer(k: int, of: str = "ra") -> tuple[str, str, str]:
    """The names of layer k's outputs (RandAugment's, or 3-Augment's colour ops): what
    `layer_params` returns, in its order."""
    return f"{of}{k}.kind", f"{of}{k}.mat", f"{of}{k}.scalar"


def build_train_pipeline(source: PlanSource, batch: int, device: str, threads: int, device_id: int | None,
                         prefetch: int = 2, roi_decode: bool = True, hw_decode: bool = False, readers: int = 0):
    """The train graph: decode the plan's box (as a region of interest, or the whole image then
    a crop: some DALI versions cannot use nvJPEG's hardware decoder for regions), resize, flip,
    the plan's RandAugment or 3-Augment."""
    spec = source.spec
    layers = source.layers
    size = source.spec.img_size

    @pipeline_def(enable_conditionals=True)
    def graph():
        inputs = dict(zip(source.names, fn.external_source(
            source=source, num_outputs=len(source.names), batch=True, batch_info=True,
            **({"parallel": True, "prefetch_queue_depth": 2} if readers > 0 else {}))))
        files = inputs["files"]
        start = inputs["start"]
        shape = inputs["shape"]
        # EXIF orientation is ignored, as PIL and the plan (which reads header sizes) do.
        decoder = decoder_options(device, hw_decode)
        if roi_decode:
            img = fn.decoders.image_slice(files, start=start, shape=shape, axis_names="WH", output_type=types.RGB,
                                          adjust_orientation=False, **decoder)
        else:
            img = fn.decoders.image(files, output_type=types.RGB, adjust_orientation=False, **decoder)
            img = fn.slice(img, start=start, shape=shape, axis_names="WH")
        if spec.aug.simple_crop:
            img = simple_crop(img, inputs, size, interp(spec.aug.interpolation))
        else:
            img = fn.resize(img, size=[size, size], interp_type=interp(spec.aug.interpolation), antialias=True)
        img = fn.flip(img, horizontal=inputs["flip"])
        for k in range(layers):
            img = apply_layer(img, *(inputs[name] for name in _layer(k)), device, size)
        if spec.aug.three_augment:
            img = apply_three(img, inputs["three.op"], inputs["three.radius"], device)
            for k in range(3):
                img = apply_layer(img, *(inputs[name] for name in _layer(k, "jitter")), device, size)
        return img, inputs["tag"]

    return graph(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=prefetch,
                 seed=0, exec_dynamic=True, py_num_workers=max(readers, 1), py_start_method=reader_start_method())


def reader_start_method() -> str:
    """How DALI starts the reader processes: "fork" (fast) unless the CUDA driver is initialised
    in this process, which DALI checks itself and then refuses to fork. torch's own flag is not
    that check: `torch.cuda.is_available()` initialises the driver without setting
    `torch.cuda.is_initialized()`."""
    from nvidia.dali import backend

    driver_up = getattr(backend, "IsDriverInitialized", None)
    if driver_up is None:  # a DALI without the check: spawn wherever a GPU could be in use
        return "spawn" if torch.cuda.is_available() else "fork"
    return "spawn" if driver_up() else "fork"


@dataclass
class _Live:
    """The pipeline in use and the position (epoch, step) of the next batch it will give."""

    pipe: Any
    next: tuple[int, int]


class DaliTrainLoader:
    """Batches of the plan, decoded and augmented by DALI, as LoadedBatch on `device`.

    One pipeline (and its reader processes) serves the run: its source runs on from epoch to
    epoch, so the next epoch's first batches are decoded while this one ends, and nothing is
    started again. An `epoch()` call that does not continue where the pipeline is (a resume, a
    repeated epoch) gets a fresh pipeline from its (epoch, step): nothing prefetched for
    another position can come out of it, and every batch's tag is checked against the
    position it was planned for. `epochs`, when given, is the run's length: nothing past it is
    read. With `readers` > 0 the plan and the file reads run in that many worker processes
    (DALI's parallel external source), off the training thread. A file DALI cannot decode is
    found, reported in `bad`, skipped from then on, and the epoch continues from the first
    batch not yet delivered."""

    def __init__(self, index: ImageIndex, spec: PlanSpec, device: torch.device, threads: int,
                 rank: int = 0, world: int = 1, roi_decode: bool = True, hw_decode: bool = False,
                 readers: int = 0, epochs: int | None = None) -> None:
        if not available():
            raise RuntimeError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        self.index = index
        self.spec = spec
        self.device = device
        self.threads = max(1, threads)
        self.readers = readers
        self.rank = rank
        self.world = world
        self.epochs = epochs
        self.skip = set(index.skip)
        self.batch = spec.batch_size // world
        self.steps = steps_per_epoch(spec, len(index))
        self.roi_decode = roi_decode
        self.hw_decode = hw_decode
        self.generation = 0  # counts epoch() calls: an iterator of an earlier call stops
        self.builds = 0  # pipelines built (one per run unless resumed, repeated or a file failed)
        self._live: _Live | None = None

    def _device_id(self) -> int | None:
        return (self.device.index or 0) if self.device.type == "cuda" else None

    def _source(self, epoch: int, start: int) -> PlanSource:
        end = None if self.epochs is None else max(self.epochs, epoch + 1)
        return PlanSource(self.index, self.spec, self.rank, self.world, frozenset(self.skip), epoch, start, end)

    def _pipeline(self, epoch: int, step: int) -> _Live:
        """The pipeline whose next batch is (epoch, step): the live one, or a fresh one."""
        if self._live is not None and self._live.next == (epoch, step):
            return self._live
        self._live = None  # the old pipeline (and its readers) goes before the new one starts
        pipe = build_train_pipeline(self._source(epoch, step), self.batch,
                                    "gpu" if self._device_id() is not None else "cpu", self.threads,
                                    self._device_id(), roi_decode=self.roi_decode, hw_decode=self.hw_decode,
                                    readers=self.readers)
        with workers_start_quiet():  # the read workers start here
            pipe.build()
        self.builds += 1
        self._live = _Live(pipe, (epoch, step))
        return self._live

    def _after(self, epoch: int, step: int) -> tuple[int, int]:
        return (epoch + 1, 0) if step + 1 == self.steps else (epoch, step + 1)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[LoadedBatch]:
        self.generation += 1
        return self._batches(epoch, start_step, self.generation)

    def _batches(self, epoch: int, step: int, generation: int) -> Iterator[LoadedBatch]:
        while step < self.steps:
            if generation != self.generation:
                raise RuntimeError("this iterator belongs to an earlier epoch() call; another epoch was started")
            live = self._pipeline(epoch, step)
            try:
                out, tag = live.pipe.run()
            except StopIteration:
                return
            except RuntimeError:
                # A file of the batches in flight failed to decode: find it, skip it from now
                # on, and start again at the first batch not yet delivered.
                if not self._skip_culprits(epoch, step):
                    raise
                FAILED.append(live.pipe)
                self._live = None
                continue
            live.next = self._after(epoch, step)
            yield self._batch(epoch, step, out, np.array(tag.as_tensor()))
            step += 1

    def _skip_culprits(self, epoch: int, step: int) -> bool:
        """Find the files DALI refuses among the batches that may be in flight; True if any."""
        source = self._source(epoch, step)
        ahead = [source.position(k) for k in range(4 + self.readers)]
        if self.epochs is not None:
            ahead = [(e, s) for e, s in ahead if e < source.end]
        rows = sorted({int(i) for e, s in ahead for i in source.plan(e, s).index} - self.skip)
        culprits = dali_unreadable(self.index, rows, self._device_id())
        self.skip.update(culprits)
        return bool(culprits)

    def _batch(self, epoch: int, step: int, out, tag: np.ndarray) -> LoadedBatch:
        if (int(tag[0, 0]), int(tag[0, 1])) != (epoch, step):  # never a batch of another position
            raise RuntimeError(f"DALI produced the batch of (epoch, step) {tuple(int(v) for v in tag[0, :2])} "
                               f"where {(epoch, step)} was expected")
        plan = make_plan(self.spec, self.index.sizes, epoch, step).shard(self.rank, self.world)
        bad = tag[:, 2].astype(bool)
        self.skip.update(int(i) for i in plan.index[bad])  # files a reader refused: skipped from now on
        return LoadedBatch.of(to_torch(out, self.device), self.index, plan, bad)


