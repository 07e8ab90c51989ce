"""Which pipeline feeds the trainer — DALI or the torch reference — behind one interface.

Both execute the same plan and hand over LoadedBatch (uint8 images, labels, plan, bad files)
for training, and (uint8 images, labels, ok) batches for evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from fastdeit.config.schema import DataConfig, Loader
from fastdeit.data.folder import ImageIndex, find_unreadable
from fastdeit.data.plan import PlanSpec
from fastdeit.errors import ConfigError, UserError
from fastdeit.pipelines import dali
from fastdeit.pipelines.batch import LoadedBatch
from fastdeit.pipelines.dali import decode as dali_decode
from fastdeit.pipelines.reference import eval_loader, train_loader
from fastdeit.pipelines.tail import TailSpec


def choose_loader(name: Loader, device: torch.device) -> tuple[str, str]:
    """(loader, why): `auto` takes DALI when CUDA and DALI are both there, else torch."""
    if name == "dali" and not dali.available():
        raise ConfigError("data.loader", "dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130), "
                                         "or use torch")
    if name == "dali" and device.type == "cuda":
        check_dali_cuda()
    if name != "auto":
        return name, f"--loader {name}"
    if device.type == "cuda" and dali.available():
        check_dali_cuda()
        return "dali", "CUDA and DALI are available"
    if device.type != "cuda":
        return "torch", "no CUDA device; --loader dali runs DALI on the CPU"
    return "torch", "DALI is not installed (pip install nvidia-dali-cuda130)"


def cuda_driver_version() -> int | None:
    """The CUDA version the installed driver supports (12040 for 12.4), from libcuda; None
    without a driver."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    return version.value if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else None


def check_dali_cuda() -> None:
    """A DALI wheel built for a newer CUDA than the driver supports fails deep inside DALI:
    say so in one line, with the wheel that fits."""
    driver, built = cuda_driver_version(), dali.cuda_major()
    if driver and built and built > driver // 1000:
        raise UserError(f"the installed DALI is built for CUDA {built} (nvidia-dali-cuda{built}0) and this driver "
                        f"supports CUDA {driver // 1000}.{driver % 1000 // 10}: pip uninstall nvidia-dali-cuda{built}0 "
                        f"&& pip install 'fastdeit[cuda{driver // 1000}]' (or use --loader torch)")


def check_decoders(name: Loader) -> tuple[str, ...]:
    """The decoders `fastdeit check-data --loader NAME` tries: auto means the torch reference's
    (PIL) and, where DALI is installed, DALI's, since each refuses files the other reads."""
    if name == "auto":
        return ("torch", "dali") if dali.available() else ("torch",)
    choose_loader(name, torch.device("cpu"))  # DALI asked for but not installed: one line
    return (name,)


def find_undecodable(index: ImageIndex, decoders: tuple[str, ...], device: torch.device,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[int, list[str]]:
    """Rows of `index` that a decoder refuses -> the decoders that refuse them. PIL decodes
    JPEGs at 1/8 scale (every byte is still read); DALI decodes whole images, on the GPU when
    there is one."""
    bad: dict[int, list[str]] = {}
    rows = list(range(len(index)))

    def report(decoder: str) -> Callable[[int, int], None]:
        return lambda done, total: progress(decoder, done, total) if progress else None

    if "torch" in decoders:
        for i in find_unreadable(index, rows, progress=report("torch")):
            bad.setdefault(i, []).append("torch")
    if "dali" in decoders:
        device_id = (device.index or 0) if device.type == "cuda" else None
        for i in dali_decode.dali_unreadable(index, rows, device_id, progress=report("dali")):
            bad.setdefault(i, []).append("dali")
    return dict(sorted(bad.items()))


def skip_line(path: str) -> str:
    """A skip list's line for `path` (`train/<class>/<file>`): the path as it is, or, where it
    holds a newline or another control character, bytes that are not UTF-8, or edge spaces,
    the path as a JSON string (ASCII), which `read_skip_list` reads back to the same name."""
    plain = path.isprintable() and path == path.strip() and not path.startswith(('"', "#"))
    return path if plain else json.dumps(path)


def _unquote(line: str, path: str) -> str:
    if not line.startswith('"'):
        return line
    try:
        name = json.loads(line)
    except ValueError:
        name = None
    if not isinstance(name, str):
        raise UserError(f"data.skip_list {path}: {line!r} starts with a quote but is not a JSON string "
                        f"(check-data quotes only names holding newlines or bytes that are not UTF-8)")
    return name


def read_skip_list(path: str, train: ImageIndex, val: ImageIndex) -> tuple[ImageIndex, ImageIndex]:
    """Add the files of a skip list (lines `train/<class>/<file>` or `val/...`, as
    `fastdeit check-data` prints them: quoted where `skip_line` quotes) to each split's skip set."""
    if not path:
        return train, val
    try:
        text = Path(path).read_text(errors="surrogateescape")  # bytes that are not UTF-8 stay the name's
        lines = [_unquote(ln.strip(), path) for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError as e:
        raise UserError(f"data.skip_list: cannot read {path}: {e.strerror}") from None
    split = {"train": [], "val": []}
    for line in lines:
        head, _, rest = line.partition("/")
        if head not in split or not rest:
            raise UserError(f"data.skip_list {path}: {line!r} is not train/<class>/<file> or val/<class>/<file>")
        split[head].append(rest)
    return train.with_skip(split["train"]), val.with_skip(split["val"])


class Loaders:
    """The trainer's data source for one run: train batches per epoch and eval batches."""

    def __init__(self, kind: Loader, data: DataConfig, spec: PlanSpec | None, device: torch.device,
                 rank: int = 0, world: int = 1, epochs: int | None = None, tail: TailSpec | None = None) -> None:
        """`spec`: the plan of training batches; None for a loader that only evaluates.
        `epochs`: how many epochs the run trains, when known; DALI reads nothing past them.
        `tail`: the batch tail the torch loader runs in its workers on a CPU device (the
        training process then only trains); ignored elsewhere, where the step runs it on the
        device."""
        self.tail = tail if kind == "torch" and device.type == "cpu" else None
        self.kind = kind
        self.data = data
        self.spec = spec
        self.device = device
        self.rank, self.world = rank, world
        self.epochs = epochs
        self._dali: dali.DaliTrainLoader | None = None
        self._val_checked: tuple[ImageIndex, ImageIndex] | None = None  # (val index, with PIL's rejects skipped)

    def train(self, index: ImageIndex, epoch: int, start_step: int) -> Iterator[LoadedBatch]:
        if self.spec is None:
            raise ValueError("this Loaders was made for evaluation only (no plan)")
        if self.kind == "dali":
            if self._dali is None:
                self._dali = dali.DaliTrainLoader(index, self.spec, self.device, self.data.workers, self.rank,
                                                  self.world, self.data.roi_decode, self.data.hw_decode,
                                                  self.data.read_workers, self.epochs)
            return self._dali.epoch(epoch, start_step)
        return train_loader(index, self.spec, epoch, start_step, self.data.workers, self.rank, self.world,
                            pin=self.device.type == "cuda", tail=self.tail)

    def eval(self, index: ImageIndex, rows: np.ndarray | None = None) -> Iterable:
        d = self.data
        if self.kind == "dali":
            return dali.dali_eval_batches(self._pil_checked(index, rows), d.img_size, d.crop_pct, d.eval_batch_size,
                                          self.device, d.workers, rows, d.hw_decode)
        return eval_loader(index, d.img_size, d.crop_pct, d.eval_batch_size, d.workers, rows,
                           pin=self.device.type == "cuda")

    def _pil_checked(self, index: ImageIndex, rows: np.ndarray | None) -> ImageIndex:
        """The val index with the files PIL cannot decode skipped, checked once per run: DALI
        decodes some files the reference rejects (a JPEG with a corrupt scan), and both
        pipelines must evaluate the same images."""
        if self._val_checked is None or self._val_checked[0] is not index:
            mine = range(len(index)) if rows is None else (int(i) for i in rows)
            bad = find_unreadable(index, [i for i in mine if i not in index.skip])
            self._val_checked = (index, index.with_skip([index.paths[i] for i in bad]))
        return self._val_checked[1]
