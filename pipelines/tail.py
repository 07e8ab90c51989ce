"""The batch tail, on the device: normalize, random erasing, mixup/cutmix, smoothed targets, cast.

Shared by every pipeline (they all hand over a uint8 batch and its plan). The order follows
DeiT: erasing is a per-sample transform after normalization, mixing is batch-level after it.
Erasing's per-pixel noise comes from a counter-based hash of (seed, epoch, position, pixel),
not from a device RNG, so the same plan gives the same pixels on the CPU and on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastdeit.config import IMAGENET_MEAN, IMAGENET_STD
from fastdeit.plan import BatchPlan

_M32 = 0xFFFFFFFF


@dataclass
class TailOutput:
    images: torch.Tensor  # [b, 3, S, S] in the compute dtype, normalized, erased, mixed
    targets: torch.Tensor  # [b, classes] float32: smoothed one-hot labels mixed with the plan's λ


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [b, 3, H, W] -> (x / 255 - mean) / std, in float32 then cast."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).to(dtype)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding uint32 values. Multipliers stay below
    2**31 so every product fits in int64 and CPU and CUDA agree bit for bit."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def erase_noise(seed: int, epoch: int, pos: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Standard normal noise [b, *shape] keyed by (seed, epoch, pos[i], element): Box–Muller on
    two hashed uniforms. Same keys give the same values on any device."""
    c, h, w = shape
    dev = pos.device
    key = _mix32(_mix32(torch.tensor((seed & _M32) ^ 0x5EED, device=dev)) ^ (epoch & _M32))
    key = _mix32(key ^ (pos.to(torch.int64) & _M32)).view(-1, 1)
    elem = torch.arange(c * h * w, device=dev, dtype=torch.int64).view(1, -1)
    a = _mix32(key ^ _mix32(elem * 2 + 1))
    b = _mix32(a ^ 0x68E31DA4)
    u1 = (a.double() + 1.0) / 4294967297.0  # in (0, 1): log is finite
    u2 = b.double() / 4294967296.0
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.float().view(-1, c, h, w)


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


def apply_tail(images: torch.Tensor, labels: torch.Tensor, plan: BatchPlan, num_classes: int,
               smoothing: float, dtype: torch.dtype = torch.float32) -> TailOutput:
    """uint8 images (on the device) + their plan -> the student's input and soft targets."""
    dev = images.device
    _, c, s, _ = images.shape
    x = normalize(images)
    # Branch on the plan's host arrays, not on device tensors: no device sync.
    rows = np.flatnonzero(plan.erase[:, 2] > 0)
    if len(rows):
        e = plan.erase[rows]  # (top, left, h, w) -> (y0, y1, x0, x1)
        box = torch.from_numpy(np.stack([e[:, 0], e[:, 0] + e[:, 2], e[:, 1], e[:, 1] + e[:, 3]], 1)).to(dev)
        noise = erase_noise(plan.seed, plan.epoch, torch.from_numpy(plan.pos[rows]).to(dev), (c, s, s))
        r = torch.from_numpy(rows).to(dev)
        x[r] = torch.where(_box_mask(box, s), noise, x[r])
    y = smooth_one_hot(labels.to(dev), num_classes, smoothing)
    if (plan.lam < 1).any():
        partner = torch.from_numpy(plan.partner).to(dev)
        lam = torch.from_numpy(plan.lam).to(dev)
        xp = x[partner]
        cut = torch.from_numpy(plan.cutmix).to(dev).view(-1, 1, 1, 1)
        in_box = _box_mask(torch.from_numpy(plan.box).to(dev), s) & cut
        l4 = lam.view(-1, 1, 1, 1)
        x = torch.where(cut, torch.where(in_box, xp, x), l4 * x + (1 - l4) * xp)
        y = lam.view(-1, 1) * y + (1 - lam.view(-1, 1)) * y[partner]
    return TailOutput(images=x.to(dtype), targets=y)
