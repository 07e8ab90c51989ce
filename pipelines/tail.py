"""The batch tail: normalize, random erasing, mixup/cutmix, smoothed soft labels, cast.

Shared by every pipeline (they all hand over a uint8 batch and its plan). It runs on the
device, in Step.prepare, except in a CPU run, whose torch loader workers run it (`TailSpec`).
Normalizing, erasing and mixing have a GPU branch (`images_whole`: a vectorised pass per
stage, a fixed number of kernels) and a CPU branch (`images_by_pairs`: every stage for one row
and its partner at a time, in the core's cache, erasing only the boxes); a test holds them
equal. The order follows DeiT: erasing is a per-sample transform after normalization, mixing
is batch-level after it.
Erasing's per-pixel noise comes from a counter-based hash of (seed, epoch, position, pixel),
not from a device RNG, so the same plan gives the same pixels on the CPU and on a GPU (up
to the last bit of log and cos).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from fastdeit.config.schema import IMAGENET_MEAN, IMAGENET_STD
from fastdeit.data.plan import BatchPlan
from fastdeit.pipelines.batch import LoadedBatch
from fastdeit.runtime.device import to_device

_M32 = 0xFFFFFFFF


@dataclass
class TailOutput:
    images: torch.Tensor  # [b, 3, S, S] in the compute dtype, normalized, erased, mixed
    soft_labels: torch.Tensor  # [b, classes] float32: smoothed one-hot labels mixed with the plan's λ


@dataclass(frozen=True)
class TailSpec:
    """What the tail needs besides a batch, so that a loader can run it where the batch is made:
    a CPU run's loader workers, in parallel and off the training process. The output is the
    one Step.prepare would make of the same batch."""

    num_classes: int
    smoothing: float
    dtype: torch.dtype  # the compute dtype

    def apply(self, batch: LoadedBatch) -> LoadedBatch:
        out = apply_tail(batch.images, batch.labels, batch.plan, self.num_classes, self.smoothing, self.dtype)
        return replace(batch, images=out.images, soft_labels=out.soft_labels)


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std x 255, [1, 3, 1, 1]: made once per device, no copy in the step."""
    if device not in _MEAN_STD:
        _MEAN_STD[device] = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255,
                             torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)
    return _MEAN_STD[device]


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [b, 3, H, W] -> (x / 255 - mean) / std, in float32 then cast."""
    mean, std = _mean_std(images.device)
    return images.float().sub_(mean).div_(std).to(dtype)  # in place on the fresh float copy


def _mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash on int64 tensors holding uint32 values. Multipliers stay below
    2**31 so every product fits in int64 and CPU and CUDA agree bit for bit."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def _base_key(seed: int, epoch: int) -> int:
    """The (seed, epoch) part of the keys, hashed on the host: a Python int, no tensor to copy."""
    key = _mix32(_mix32((seed & _M32) ^ 0x5EED) ^ (epoch & _M32))
    return int(key)


def _keys(seed: int, epoch: int, pos: torch.Tensor) -> torch.Tensor:
    return _mix32((pos.to(torch.int64) & _M32) ^ _base_key(seed, epoch))


def _normal(key: torch.Tensor, elem: torch.Tensor) -> torch.Tensor:
    """Box–Muller on two uniforms hashed from (key, element index)."""
    a = _mix32(key ^ _mix32(elem * 2 + 1))
    b = _mix32(a ^ 0x68E31DA4)
    u1 = (a.float() + 1.0) / 4294967296.0  # in (0, 1]: the log is finite
    u2 = b.float() / 4294967296.0
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def erase_noise(seed: int, epoch: int, pos: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Standard normal noise [b, *shape] keyed by (seed, epoch, pos[i], element index). The
    same keys give the same values on any device and in any shard (up to the last bit of
    log/cos), and a region can be computed alone (see `erase_box_noise`)."""
    c, h, w = shape
    key = _keys(seed, epoch, pos).view(-1, 1)
    elem = torch.arange(c * h * w, device=pos.device, dtype=torch.int64).view(1, -1)
    return _normal(key, elem).view(-1, c, h, w)


def erase_box_noise(seed: int, epoch: int, pos: int, c: int, s: int, box: tuple[int, int, int, int],
                    device: torch.device) -> torch.Tensor:
    """The values `erase_noise` gives inside one box (top, left, h, w) of one sample."""
    top, left, h, w = box
    ch = torch.arange(c, device=device).view(-1, 1, 1) * (s * s)
    ys = torch.arange(top, top + h, device=device).view(1, -1, 1) * s
    xs = torch.arange(left, left + w, device=device).view(1, 1, -1)
    key = int(_mix32((pos & _M32) ^ _base_key(seed, epoch)))
    return _normal(key, ch + ys + xs)


def _box_mask(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[b, 1, S, S] bool: inside each row's box (y0, y1, x0, x1)."""
    r = torch.arange(size, device=boxes.device)
    y0, y1, x0, x1 = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    inside = (r.view(1, -1, 1) >= y0) & (r.view(1, -1, 1) < y1) & (r.view(1, 1, -1) >= x0) & (r.view(1, 1, -1) < x1)
    return inside.unsqueeze(1)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    y = torch.full((len(labels), num_classes), off, device=labels.device)
    return y.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def tail_inputs(plan: BatchPlan, labels: np.ndarray) -> dict[str, np.ndarray]:
    """What the tail needs of the plan on the device, as host arrays (Step.prepare copies them
    with the teacher's in one transfer): labels, λ, partners and the erased rows' boxes."""
    rows = np.flatnonzero(plan.erase[:, 2] > 0)
    e = plan.erase[rows]  # (top, left, h, w) -> (y0, y1, x0, x1)
    return {"labels": np.asarray(labels, np.int64), "lam": plan.lam.astype(np.float32),
            "partner": plan.partner.astype(np.int64), "erase_rows": rows.astype(np.int64),
            "erase_box": np.stack([e[:, 0], e[:, 0] + e[:, 2], e[:, 1], e[:, 1] + e[:, 3]], 1).astype(np.int64),
            "erase_pos": plan.pos[rows].astype(np.int64),
            # mix_whole's per-row blend weight (1: a cutmix row keeps its pixels outside the box)
            "mix_lam": np.where(plan.cutmix, 1.0, plan.lam).astype(np.float32),
            "mix_box": (plan.box * plan.cutmix[:, None]).astype(np.int64)}


def _images(images: torch.Tensor, plan: BatchPlan, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 images -> normalized, erased, mixed float32: a GPU's way on a GPU, a CPU's on a CPU."""
    if images.device.type == "cpu":
        return images_by_pairs(images, plan)
    return images_whole(images, plan, inputs)


def images_whole(images: torch.Tensor, plan: BatchPlan, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each stage in one vectorised pass over the batch (a GPU's way: a fixed number of
    kernels, where row by row would launch hundreds)."""
    x = normalize(images)
    if (plan.erase[:, 2] > 0).any():
        erase_whole(x, plan, inputs)
    if (plan.lam < 1).any():
        x = mix_whole(x, inputs)
    return x


def erase_whole(x: torch.Tensor, plan: BatchPlan, inputs: dict[str, torch.Tensor]) -> None:
    """Erasing in place, with timm's per-pixel noise, hashed over the erased rows' whole images."""
    _, c, s, _ = x.shape
    noise = erase_noise(plan.seed, plan.epoch, inputs["erase_pos"], (c, s, s))
    r = inputs["erase_rows"]
    x[r] = torch.where(_box_mask(inputs["erase_box"], s), noise, x[r])


def mix_whole(x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every row at once: blend with the partner by the row's weight, then the cutmix rows take
    their box from the partner."""
    xp = x[inputs["partner"]]
    lam = inputs["mix_lam"].view(-1, 1, 1, 1)
    blend = x * lam + xp * (1 - lam)
    return torch.where(_box_mask(inputs["mix_box"], x.shape[-1]), xp, blend)


def images_by_pairs(images: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
    """The same stages, one row and its partner at a time (a CPU's way). A pair's two images
    (1.2 MB at 224 px) stay in the core's cache from the uint8 pixels to the mixed floats,
    where a pass per stage over the batch goes through memory each time; erasing hashes only
    the boxes' pixels. Partners are their group reversed (plan._mixing), so a row's partner
    has it as its partner. The output is allocated in shared memory inside a loader worker,
    so handing it to the training process copies nothing."""
    b = len(images)
    x = torch.empty(images.shape, dtype=torch.float32)
    if torch.utils.data.get_worker_info() is not None:
        x.share_memory_()
    mixing = bool((plan.lam < 1).any())
    partner = plan.partner if mixing else np.arange(b)
    if not np.array_equal(partner[partner], np.arange(b)):
        raise ValueError("images_by_pairs needs partners in pairs (each group reversed)")
    for i, j in enumerate(partner.tolist()):
        if j < i:
            continue
        for r in (i,) if j == i else (i, j):
            _normalize_row(images[r], x[r])
            if plan.erase[r, 2] > 0:
                _erase_row(x[r], plan, r)
        if mixing:
            _mix_pair(x, plan, i, j)
    return x


def _normalize_row(image: torch.Tensor, out: torch.Tensor) -> None:
    """`normalize` of one image into `out`: the same float32 operations, so the same bits."""
    mean, std = _mean_std(image.device)
    torch.sub(image, mean[0], out=out)
    out.div_(std[0])


def _erase_row(x: torch.Tensor, plan: BatchPlan, r: int) -> None:
    """Row r's box in place with `erase_noise`'s values there (`erase_box_noise`)."""
    c, s, _ = x.shape
    top, left, h, w = (int(v) for v in plan.erase[r])
    x[:, top:top + h, left:left + w] = erase_box_noise(plan.seed, plan.epoch, int(plan.pos[r]), c, s,
                                                       (top, left, h, w), x.device)


def _mix_pair(x: torch.Tensor, plan: BatchPlan, i: int, j: int) -> None:
    """Rows i and j, each other's partner, mixed in place: under cutmix each takes the other's
    box; under mixup each becomes lam * itself + (1 - lam) * the other (a row that is its own
    partner, the middle of an odd group, too: as mix_whole computes it)."""
    if plan.cutmix[i]:
        y0, y1, x0, x1 = (int(v) for v in plan.box[i])
        mine = x[i, :, y0:y1, x0:x1].clone()
        x[i, :, y0:y1, x0:x1] = x[j, :, y0:y1, x0:x1]
        x[j, :, y0:y1, x0:x1] = mine
        return
    lam = float(plan.lam[i])
    rows = [i, j] if i != j else [i]
    pair = x[rows]
    x[rows] = torch.add(pair * lam, pair.flip(0), alpha=1.0 - lam)


def apply_tail(images: torch.Tensor, labels: torch.Tensor, plan: BatchPlan, num_classes: int,
               smoothing: float, dtype: torch.dtype = torch.float32,
               inputs: dict[str, torch.Tensor] | None = None) -> TailOutput:
    """uint8 images (on the device) + their plan -> the student's input and its soft labels.
    `inputs`: `tail_inputs` already on the device (else copied here). Branches read the
    plan's host arrays, never device tensors: no device sync."""
    if inputs is None:
        inputs = to_device(tail_inputs(plan, labels.numpy()), images.device)
    x = _images(images, plan, inputs)
    y = smooth_one_hot(inputs["labels"], num_classes, smoothing)
    if (plan.lam < 1).any():
        lam = inputs["lam"].view(-1, 1)
        y = lam * y + (1 - lam) * y[inputs["partner"]]
    return TailOutput(images=x.to(dtype), soft_labels=y)
