"""The DALI validation graph: decode, resize, centre crop, as torchvision's eval transform."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastdeit.data.folder import ImageIndex
from fastdeit.pipelines.dali.common import available, interp, to_torch

try:  # DALI is a Linux-only dependency; everything else works without it.
    from nvidia.dali import fn, pipeline_def, types

    from fastdeit.pipelines.dali.decode import BLANK, BLANK_SIZE, FAILED, dali_format, dali_unreadable, decoder_options
except ImportError:  # pragma: no cover - exercised only where DALI is absent
    fn = None


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


PREFETCH = 2  # batches DALI decodes ahead of the one asked for: a failure may come from any of them


def build_eval_pipeline(source, batch: int, img_size: int, interpolation: str, device: str,
                        threads: int, device_id: int | None, hw_decode: bool = False):
    """The val graph: decode, resize (shorter side to img_size / crop_pct), centre crop; the
    sizes and crop corner come from the host so that they match torchvision's rounding."""

    @pipeline_def
    def graph():
        files, labels, resized, corner = fn.external_source(source=source, num_outputs=4, batch=True)
        img = fn.decoders.image(files, output_type=types.RGB, adjust_orientation=False,
                                **decoder_options(device, hw_decode))
        img = fn.resize(img, resize_x=resized[0], resize_y=resized[1], interp_type=interp(interpolation),
                        antialias=True)
        img = fn.slice(img, start=corner, shape=types.Constant(np.array([img_size, img_size], np.int32)),
                       axis_names="WH")
        return img, labels

    return graph(batch_size=batch, num_threads=threads, device_id=device_id, seed=0, exec_dynamic=True,
                 prefetch_queue_depth=PREFETCH)


class EvalSource:
    """The val graph's external source: the batches of `rows` in order, each file DALI must not
    be fed (the skip set, formats it does not read) replaced by the first good file of the
    rows (or a blank image when none is left)."""

    def __init__(self, index: ImageIndex, rows: np.ndarray, batch: int, img_size: int, crop_pct: float) -> None:
        self.index = index
        self.img_size = img_size
        self.crop_pct = crop_pct
        self.chunks = [[int(i) for i in rows[k:k + batch]] for k in range(0, len(rows), batch)]
        self.skip = set(index.skip)
        self.next = 0  # the batch to feed next
        self.good = self.first_good()  # the file fed in place of a bad one

    def first_good(self) -> int | None:
        return next((i for c in self.chunks for i in c if i not in self.skip), None)

    def restart(self, at: int, culprits: set[int]) -> None:
        """Feed batch `at` next, with the files found undecodable skipped from now on."""
        self.skip.update(culprits)
        self.next = at
        self.good = self.first_good()

    def rows_from(self, at: int, count: int) -> list[int]:
        """The rows of batches at..at+count-1 still fed to DALI."""
        return [i for chunk in self.chunks[at:at + count] for i in chunk if i not in self.skip]

    def __call__(self) -> tuple:
        if self.next >= len(self.chunks):
            raise StopIteration
        chunk = self.chunks[self.next]
        self.next += 1
        data = {i: self.index.read(i) for i in chunk if i not in self.skip}
        self.skip.update(i for i, d in data.items() if not dali_format(d))  # a format DALI does not read
        if self.good in self.skip:
            self.good = self.first_good()
        good = self.good
        filler = BLANK if good is None else data[good] if good in data else self.index.read(good)
        filler_size = np.array(BLANK_SIZE) if good is None else self.index.sizes[good]
        files = [data[i] if i not in self.skip else filler for i in chunk]
        sizes = np.stack([self.index.sizes[i] if i not in self.skip else filler_size for i in chunk])
        resized, corner = eval_geometry(sizes, self.img_size, self.crop_pct)
        return files, self.index.labels[chunk], resized.astype(np.float32), corner.astype(np.int32)


def dali_eval_batches(index: ImageIndex, img_size: int, crop_pct: float, batch: int, device: torch.device,
                      threads: int, rows: np.ndarray | None = None, hw_decode: bool = False) -> Iterator[tuple]:
    """(uint8 NCHW images, labels, ok) batches of the val split. Unreadable files (the index's
    skip set, and any file DALI fails on: found, then skipped from that batch on) are fed as a
    copy of a good file and flagged ok=False, so that they are left out and counted."""
    if not available():
        raise RuntimeError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    source = EvalSource(index, np.arange(len(index)) if rows is None else rows, batch, img_size, crop_pct)
    device_id = (device.index or 0) if device.type == "cuda" else None
    pipe = None
    k = 0
    while k < len(source.chunks):
        chunk = source.chunks[k]
        if source.good is None:  # nothing left to decode: every row is counted unreadable
            yield (torch.zeros(len(chunk), 3, img_size, img_size, dtype=torch.uint8, device=device),
                   torch.from_numpy(index.labels[chunk]), torch.zeros(len(chunk), dtype=torch.bool))
            k += 1
            continue
        try:
            if pipe is None:
                kind = "gpu" if device_id is not None else "cpu"
                pipe = build_eval_pipeline(source, batch, img_size, "bicubic", kind, max(1, threads), device_id,
                                           hw_decode)
                pipe.build()
            images, labels = pipe.run()
        except RuntimeError:
            # A file of the batches in flight (this one and those prefetched) failed to decode:
            # find it, skip it, and start again from this batch.
            culprits = dali_unreadable(index, source.rows_from(k, 1 + PREFETCH), device_id)
            if not culprits:
                raise
            FAILED.append(pipe)
            pipe = None
            source.restart(k, set(culprits))
            continue
        ok = torch.tensor([i not in source.skip for i in chunk])
        yield to_torch(images, device), torch.from_numpy(np.array(labels.as_tensor())).view(-1), ok
        k += 1
