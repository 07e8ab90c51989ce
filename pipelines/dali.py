"""NVIDIA DALI pipelines that execute the augmentation plan: the production data path.

One graph builder with a device switch: "gpu" decodes with nvJPEG ("mixed", the hardware
decoder where there is one) and augments on the GPU; "cpu" is the same graph with CPU
operators and device_id=None (libjpeg-turbo), which is what runs without a GPU and in the
tests. The plan reaches the graph through fn.external_source, one step's shard per call:
file bytes, crop boxes (decoded as a region of interest), flips and the RandAugment
parameters. DALI's own RNG is never used, so a plan gives the same batch as the reference
pipeline up to decoder and resampler differences (see tests/test_pipeline_dali.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from fastdeit.data.folder import ImageIndex, find_unreadable
from fastdeit.pipelines.torch import LoadedBatch
from fastdeit.plan import BatchPlan, PlanSpec, make_plan, steps_per_epoch

try:  # DALI is a Linux-only dependency; everything else works without it.
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from fastdeit.pipelines.dali_augment import apply_layer, layer_params
except ImportError:  # pragma: no cover - exercised only where DALI is absent
    fn = None


def available() -> bool:
    return fn is not None


def _interp(name: str):
    return {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[name]


def substitute_bad_rows(plan: BatchPlan, bad: np.ndarray) -> np.ndarray:
    """Row -> the row whose inputs it takes: itself, or for a bad file the nearest good row
    before it (after it, for the first rows) — the reference pipeline's rule."""
    take = np.arange(len(plan))
    good = np.flatnonzero(~bad)
    if len(good) == 0:
        raise RuntimeError(f"every image of batch (epoch {plan.epoch}, step {plan.step}) is unreadable")
    for i in np.flatnonzero(bad):
        before = good[good < i]
        take[i] = before[-1] if len(before) else good[0]
    return take


@dataclass
class _Step:
    plan: BatchPlan
    labels: np.ndarray
    bad: tuple[str, ...]


@dataclass
class PlanSource:
    """fn.external_source callback: each call returns the graph inputs of the next step of
    the epoch (this rank's shard), and queues its plan for the consumer."""

    index: ImageIndex
    spec: PlanSpec
    rank: int = 0
    world: int = 1
    skip: set[int] = field(default_factory=set)
    epoch: int = 0
    next_step: int = 0
    pending: deque = field(default_factory=deque)

    def begin(self, epoch: int, start_step: int) -> None:
        self.epoch, self.next_step = epoch, start_step
        self.pending.clear()

    @property
    def layers(self) -> int:
        ra = self.spec.rand_augment
        return ra.num_layers if ra is not None else 0

    def __call__(self) -> tuple:
        if self.next_step >= steps_per_epoch(self.spec, len(self.index)):
            raise StopIteration
        plan = make_plan(self.spec, self.index.sizes, self.epoch, self.next_step).shard(self.rank, self.world)
        self.next_step += 1
        bad = np.array([i in self.skip for i in plan.index])
        take = substitute_bad_rows(plan, bad)
        idx = plan.index[take]
        files = [np.fromfile(self.index.root / self.index.paths[i], dtype=np.uint8) for i in idx]
        crop = plan.crop[take]
        out = [files, crop[:, :2].copy(), crop[:, 2:].copy(), plan.flip[take].astype(np.int32)]
        for layer in range(self.layers):
            kind, mat, scalar = layer_params(self.spec.ra_ops, plan.ra_op[take, layer], plan.ra_arg[take, layer],
                                             self.spec.img_size)
            out += [kind, mat, scalar]
        self.pending.append(_Step(plan, self.index.labels[idx],
                                  tuple(self.index.paths[i] for i in plan.index[bad])))
        return tuple(out)


def build_train_pipeline(source: PlanSource, batch: int, device: str, threads: int, device_id: int | None,
                         prefetch: int = 2, roi_decode: bool = True):
    """The train graph: decode the plan's box (as a region of interest, or the whole image then
    a crop: some DALI versions cannot use nvJPEG's hardware decoder for regions), resize, flip,
    the plan's RandAugment."""
    spec, layers, size = source.spec, source.layers, source.spec.img_size

    @pipeline_def(enable_conditionals=True)
    def graph():
        inputs = fn.external_source(source=source, num_outputs=4 + 3 * layers, batch=True)
        files, start, shape, flip = inputs[:4]
        # EXIF orientation is ignored, as PIL and the plan (which reads header sizes) do.
        decoder = "mixed" if device == "gpu" else "cpu"
        if roi_decode:
            img = fn.decoders.image_slice(files, start=start, shape=shape, axis_names="WH", output_type=types.RGB,
                                          adjust_orientation=False, device=decoder)
        else:
            img = fn.decoders.image(files, output_type=types.RGB, adjust_orientation=False, device=decoder)
            img = fn.slice(img, start=start, shape=shape, axis_names="WH")
        img = fn.resize(img, size=[size, size], interp_type=_interp(spec.aug.interpolation), antialias=True)
        img = fn.flip(img, horizontal=flip)
        for k in range(layers):
            kind, mat, scalar = inputs[4 + 3 * k: 7 + 3 * k]
            img = apply_layer(img, kind, mat, scalar, device, size)
        return img

    return graph(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=prefetch,
                 seed=0, exec_dynamic=True)


def _to_torch(out, device: torch.device) -> torch.Tensor:
    """DALI uint8 NHWC batch -> torch NCHW view, copied once into torch memory (no host
    round-trip on the GPU)."""
    dense = out.as_tensor()
    t = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
    feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return t.permute(0, 3, 1, 2)


class DaliTrainLoader:
    """Batches of the plan, decoded and augmented by DALI, as LoadedBatch on `device`.

    A file DALI cannot decode at run time is found (with PIL), reported in `bad`, added to
    the skip set, and the epoch continues from the first batch not yet delivered."""

    def __init__(self, index: ImageIndex, spec: PlanSpec, device: torch.device, threads: int,
                 rank: int = 0, world: int = 1, roi_decode: bool = True) -> None:
        if not available():
            raise RuntimeError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        self.index, self.spec, self.device = index, spec, device
        self.threads = max(1, threads)
        self.source = PlanSource(index, spec, rank, world, skip=set(index.skip))
        self.batch = spec.batch_size // world
        self.roi_decode = roi_decode
        self.pipe = None

    def _build(self) -> None:
        gpu = self.device.type == "cuda"
        self.pipe = build_train_pipeline(self.source, self.batch, "gpu" if gpu else "cpu", self.threads,
                                         (self.device.index or 0) if gpu else None, roi_decode=self.roi_decode)
        self.pipe.build()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[LoadedBatch]:
        self.source.begin(epoch, start_step)
        if self.pipe is None:
            self._build()
        else:
            self.pipe.reset()
        while True:
            try:
                (out,) = self.pipe.run()
            except StopIteration:
                return
            except RuntimeError:
                # Some file of the batches in flight failed to decode: find it, skip it from
                # now on, and restart from the first batch not yet delivered.
                first = self.source.pending[0].plan.step if self.source.pending else self.source.next_step
                rows = sorted({int(i) for s in self.source.pending for i in s.plan.index} - self.source.skip)
                culprits = find_unreadable(self.index, rows)
                if not culprits:
                    raise
                self.source.skip.update(culprits)
                self.source.begin(epoch, first)
                self._build()
                continue
            step = self.source.pending.popleft()
            yield LoadedBatch(images=_to_torch(out, self.device), labels=torch.from_numpy(step.labels),
                              plan=step.plan, bad=step.bad)


def eval_geometry(sizes: np.ndarray, img_size: int, crop_pct: float) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's Resize(int(img_size / crop_pct)) + CenterCrop(img_size), computed on the
    host from the source sizes: (resized width, height) [n, 2] and crop (left, top) [n, 2]."""
    short_to = int(img_size / crop_pct)
    w, h = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)
    short, long = np.minimum(w, h), np.maximum(w, h)
    new_long = (short_to * long) // np.maximum(short, 1)
    new_w = np.where(w <= h, short_to, new_long)
    new_h = np.where(w <= h, new_long, short_to)
    left = np.round((new_w - img_size) / 2.0)
    top = np.round((new_h - img_size) / 2.0)
    return np.stack([new_w, new_h], 1), np.stack([left, top], 1).astype(np.int64)


def build_eval_pipeline(source, batch: int, img_size: int, interpolation: str, device: str,
                        threads: int, device_id: int | None):
    """The val graph: decode, resize (shorter side to img_size / crop_pct), centre crop; the
    sizes and crop corner come from the host so that they match torchvision's rounding."""

    @pipeline_def
    def graph():
        files, labels, resized, corner = fn.external_source(source=source, num_outputs=4, batch=True)
        img = fn.decoders.image(files, output_type=types.RGB, adjust_orientation=False,
                                device="mixed" if device == "gpu" else "cpu")
        img = fn.resize(img, resize_x=resized[0], resize_y=resized[1], interp_type=_interp(interpolation),
                        antialias=True)
        img = fn.slice(img, start=corner, shape=types.Constant(np.array([img_size, img_size], np.int32)),
                       axis_names="WH")
        return img, labels

    return graph(batch_size=batch, num_threads=threads, device_id=device_id, seed=0, exec_dynamic=True)


def dali_eval_batches(index: ImageIndex, img_size: int, crop_pct: float, batch: int, device: torch.device,
                      threads: int, rows: np.ndarray | None = None) -> Iterator[tuple]:
    """(uint8 NCHW images, labels, ok) batches of the val split; unreadable files (the index's
    skip set) are fed as a copy of a good file and flagged ok=False."""
    if not available():
        raise RuntimeError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    rows = np.arange(len(index)) if rows is None else rows
    good = next((i for i in rows if i not in index.skip), 0)
    chunks = [rows[k:k + batch] for k in range(0, len(rows), batch)]
    it = iter(chunks)

    def source():
        use = [good if i in index.skip else int(i) for i in next(it)]
        resized, corner = eval_geometry(index.sizes[use], img_size, crop_pct)
        return ([np.fromfile(index.root / index.paths[i], dtype=np.uint8) for i in use],
                index.labels[use], resized.astype(np.float32), corner.astype(np.int32))

    gpu = device.type == "cuda"
    pipe = build_eval_pipeline(source, batch, img_size, "bicubic", "gpu" if gpu else "cpu", max(1, threads),
                               (device.index or 0) if gpu else None)
    pipe.build()
    for chunk in chunks:
        images, labels = pipe.run()
        ok = torch.tensor([i not in index.skip for i in chunk])
        yield _to_torch(images, device), torch.from_numpy(np.array(labels.as_tensor())).view(-1), ok
