"""The reference pipeline: PIL and torchvision semantics, executing a BatchPlan.

It is the slow twin of the DALI pipelines and their test oracle. Per sample: decode, crop by
the plan's box in source pixels and resize to the training size (or DeiT III's simple random
crop), flip, then the plan's RandAugment ops with timm's own PIL implementations, or DeiT
III's 3-Augment with the PIL and torchvision calls of the official augment.py. Output is a
uint8 batch; the batch tail (pipelines/tail.py) does the rest on the device.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data.auto_augment import NAME_TO_OP
from torchvision.transforms import functional as TF

from fastdeit.data.folder import ImageIndex
from fastdeit.data.plan import SRC_PAD, THREE_OPS, BatchPlan, PlanSpec, make_plan, src_resized, steps_per_epoch
from fastdeit.pipelines.batch import FILL, LoadedBatch, substitutes
from fastdeit.pipelines.tail import TailSpec
from fastdeit.runtime.signals import quiet_worker, workers_start_quiet

_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_NO_ARG_OPS = {"AutoContrast", "Equalize", "Invert"}
_INT_ARG_OPS = {"Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing", "SolarizeAdd"}


def rand_augment_op(img: Image.Image, name: str, arg: float, interpolation: str = "bicubic") -> Image.Image:
    """Apply one RandAugment op of timm with a concrete argument (sign already applied)."""
    if name in _NO_ARG_OPS:
        return NAME_TO_OP[name](img)
    value = int(arg) if name in _INT_ARG_OPS else float(arg)
    if name.startswith("Posterize") and value <= 0:
        # Keeping 0 bits gives black; Pillow >= 12 refuses bits=0, which timm asks for at magnitude 10.
        return img.point(lambda _: 0)
    return NAME_TO_OP[name](img, value, fillcolor=FILL, resample=_INTERP[interpolation])


_JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)  # plan.JITTER's order


def three_augment(img: Image.Image, op: int, radius: float, jitter: np.ndarray, order: np.ndarray) -> Image.Image:
    """DeiT III's 3-Augment on one image with the plan's draws: grayscale (torchvision's
    Grayscale(3)), solarize (ImageOps.solarize at 128) or Gaussian blur (PIL's, of `radius`),
    then ColorJitter's brightness, contrast and saturation factors in `order`."""
    name = THREE_OPS[op]
    if name == "grayscale":
        img = TF.to_grayscale(img, num_output_channels=3)
    elif name == "solarize":
        img = ImageOps.solarize(img)
    else:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(radius)))
    for k in order:
        if jitter[k] != 1.0:
            img = _JITTER_OPS[k](img, float(jitter[k]))
    return img


def simple_crop(img: Image.Image, window: np.ndarray, size: int, interpolation: str) -> Image.Image:
    """DeiT III's simple random crop with the plan's window (top, left): torchvision's Resize(size)
    (PIL's resize to `src_resized`), the 4 px reflect padding of RandomCrop (numpy's 'reflect', as
    torchvision pads a PIL image), then the size x size window."""
    height, width = (int(v) for v in src_resized(np.array([img.size]), size)[0])
    pixels = np.asarray(img.resize((width, height), _INTERP[interpolation]))
    padded = np.pad(pixels, ((SRC_PAD, SRC_PAD), (SRC_PAD, SRC_PAD), (0, 0)), mode="reflect")
    top, left = (int(v) for v in window)
    return Image.fromarray(padded[top:top + size, left:left + size])


def _unmarked(stage: str) -> None:
    """`augment`'s stage marks when nobody times them."""


def augment(img: Image.Image, crop: np.ndarray, flip: bool, ops: list[tuple[str, float]],
            size: int, interpolation: str, three: tuple | None = None, src: np.ndarray | None = None,
            mark: Callable[[str], None] = _unmarked) -> Image.Image:
    """Crop (left, top, width, height) and resize to size x size (or the simple random crop's
    `src` window), flip, then the RandAugment ops (or 3-Augment: `three` holds its draws for
    `three_augment`). `mark(stage)` is called as each stage ends (benchmarks/loader.py's
    profile times the stages of this very function)."""
    left, top, w, h = (int(v) for v in crop)
    if src is not None and src[0] >= 0:
        img = simple_crop(img, src, size, interpolation)
    else:
        img = img.crop((left, top, left + w, top + h)).resize((size, size), _INTERP[interpolation])
    mark("crop + resize")
    if flip:
        img = ImageOps.mirror(img)
    mark("flip")
    for name, arg in ops:
        img = rand_augment_op(img, name, arg, interpolation)
    mark("RandAugment")
    if three is not None:
        img = three_augment(img, *three)
        mark("3-Augment")
    return img


def augment_row(img: Image.Image, spec: PlanSpec, plan: BatchPlan, i: int,
                mark: Callable[[str], None] = _unmarked) -> Image.Image:
    """`augment` of row `i` of `plan`, with the row's draws."""
    ops = [(spec.ra_ops[o], float(a)) for o, a in zip(plan.ra_op[i], plan.ra_arg[i]) if o >= 0]
    three = (int(plan.three_op[i]), plan.blur[i], plan.jitter[i], plan.jitter_order[i]) \
        if plan.three_op[i] >= 0 else None
    return augment(img, plan.crop[i], bool(plan.flip[i]), ops, spec.img_size, spec.aug.interpolation, three,
                   plan.src[i], mark)


# What PIL raises on a corrupt, truncated or unknown file.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# Grayscale wider than 8 bits (16-bit PNG and TIFF, 32-bit integer TIFF): PIL's
# convert("RGB") clips it, so a mid-gray image reads as white; DALI scales it to 8 bits.
_WIDE_GRAY = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """An image as 8-bit RGB, the pixels DALI's decoder gives (RGB output): wide grayscale
    scaled as round(v / 257), alpha and a palette's transparency dropped, colours kept.
    Every PIL path (training, evaluation, predict, prepare-data) converts through here."""
    if img.mode in _WIDE_GRAY:
        wide = np.asarray(img).astype(np.int64)
        img = Image.fromarray(np.clip((wide + 128) // 257, 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the same colours; P -> RGB directly warns on every such file
    return img.convert("RGB")


def decode(source: str | io.BytesIO) -> Image.Image:
    with Image.open(source) as img:
        return to_rgb(img)


def load_plan_rows(index: ImageIndex, spec: PlanSpec, plan: BatchPlan) -> LoadedBatch:
    """Decode and augment every row of `plan`. A file that fails to decode is reported in
    `bad`, and its row takes the image and label of another row (batch.substitutes), so
    shapes stay static and the run goes on."""
    s = spec.img_size
    out = np.empty((len(plan), s, s, 3), np.uint8)
    ok = np.ones(len(plan), bool)
    for i, idx in enumerate(plan.index):
        try:
            if idx in index.skip:
                raise OSError("listed as unreadable")
            img = decode(index.open(idx))
        except DECODE_ERRORS:  # a corrupt file must not end a long run; it is reported by name
            ok[i] = False
            continue
        out[i] = np.asarray(augment_row(img, spec, plan, i))
    take = substitutes(plan, ~ok, index)
    out[~ok] = out[take[~ok]]  # bad rows take good ones: the copy never reads a bad row
    return LoadedBatch.of(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), index, plan, ~ok)


class TrainBatches(torch.utils.data.Dataset):
    """Item k is this rank's shard of the plan of step `start_step + k` of `epoch`.

    Workers compute the plan themselves (it is a pure function), so nothing but the spec and
    the image sizes is shipped to them, and batches decode in parallel across workers. With
    `tail`, the workers run the batch tail too (a CPU run: the training process then only
    trains).
    """

    def __init__(self, index: ImageIndex, spec: PlanSpec, epoch: int, start_step: int = 0,
                 rank: int = 0, world: int = 1, tail: TailSpec | None = None) -> None:
        self.index = index
        self.spec = spec
        self.epoch = epoch
        self.start_step = start_step
        self.rank = rank
        self.world = world
        self.tail = tail
        self.steps = steps_per_epoch(spec, len(index))

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __getitem__(self, k: int) -> LoadedBatch:
        plan = make_plan(self.spec, self.index.sizes, self.epoch, self.start_step + k)
        batch = load_plan_rows(self.index, self.spec, plan.shard(self.rank, self.world))
        return self.tail.apply(batch) if self.tail is not None else batch


def _as_is(batch: LoadedBatch) -> LoadedBatch:
    return batch


def _one_thread(_: int) -> None:
    # Workers decode with PIL; torch's intra-op threads would only contend with them.
    torch.set_num_threads(1)
    quiet_worker()  # stop signals are the run's to act on; a worker dies with its parent


class QuietLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers are started with the stop signals blocked (runtime/signals.py): a
    scheduler's SIGTERM to every process of the job, or Ctrl-C to the terminal's group, stops
    the run at a step boundary instead of killing a worker under it."""

    def __iter__(self):  # torch's iterator types are private: no annotation
        with workers_start_quiet():
            return super().__iter__()


def train_loader(index: ImageIndex, spec: PlanSpec, epoch: int, start_step: int, workers: int, rank: int = 0,
                 world: int = 1, pin: bool = False, tail: TailSpec | None = None) -> Iterator[LoadedBatch]:
    """Batches of one epoch from `start_step`, in plan order; in pinned memory with `pin`;
    through the tail with `tail`."""
    data = TrainBatches(index, spec, epoch, start_step, rank, world, tail)
    if workers == 0:
        return (data[k].pin_memory() if pin else data[k] for k in range(len(data)))
    loader = QuietLoader(
        data, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
        worker_init_fn=_one_thread, prefetch_factor=4, persistent_workers=False, pin_memory=pin,
        generator=torch.Generator())  # its own seed draw: the global RNG (drop path) stays untouched
    return iter(loader)


class EvalSamples(torch.utils.data.Dataset):
    """Val samples: resize the shorter side to img_size / crop_pct, centre-crop img_size."""

    def __init__(self, index: ImageIndex, img_size: int, crop_pct: float, interpolation: str = "bicubic",
                 rows: np.ndarray | None = None) -> None:
        self.index, self.size = index, img_size
        self.interp = TF.InterpolationMode(interpolation)
        self.resize = int(img_size / crop_pct)
        self.rows = np.arange(len(index)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, bool]:
        i = int(self.rows[k])
        s = self.size
        try:
            if i in self.index.skip:
                raise OSError("listed as unreadable")
            img = decode(self.index.open(i))
        except DECODE_ERRORS:  # counted and left out of the metrics by the evaluator
            return torch.zeros(3, s, s, dtype=torch.uint8), int(self.index.labels[i]), False
        img = TF.center_crop(TF.resize(img, self.resize, self.interp), [s, s])
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), int(self.index.labels[i]), True


def eval_loader(index: ImageIndex, img_size: int, crop_pct: float, batch_size: int, workers: int,
                rows: np.ndarray | None = None, pin: bool = False) -> torch.utils.data.DataLoader:
    data = EvalSamples(index, img_size, crop_pct, rows=rows)
    return QuietLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       worker_init_fn=_one_thread if workers else None, pin_memory=pin,
                                       generator=torch.Generator())


class SquareImages(torch.utils.data.Dataset):
    """Whole images resized to size x size (no crop): the teacher's view for label maps."""

    def __init__(self, index: ImageIndex, size: int, rows: np.ndarray | None = None) -> None:
        self.index, self.size = index, size
        self.rows = np.arange(len(index)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, bool]:
        i = int(self.rows[k])
        try:
            if i in self.index.skip:
                raise OSError("listed as unreadable")
            img = decode(self.index.open(i))
        except DECODE_ERRORS:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), i, False
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), i, True


def square_loader(index: ImageIndex, size: int, batch_size: int, workers: int,
                  rows: np.ndarray | None = None) -> torch.utils.data.DataLoader:
    return QuietLoader(SquareImages(index, size, rows), batch_size=batch_size, shuffle=False,
                                       num_workers=workers, worker_init_fn=_one_thread if workers else None,
                                       generator=torch.Generator())
