"""The device a process computes on, and the autocast dtype it computes in."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from fastdeit.config.schema import Amp, Device
from fastdeit.errors import ConfigError


def resolve_device(name: Device) -> torch.device:
    """`auto`: CUDA when a GPU is visible, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device", "cuda was asked for but no CUDA GPU is visible: use cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def amp_dtype(amp: Amp, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU): before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32,
                 np.dtype(np.float16): torch.float16, np.dtype(np.uint8): torch.uint8}


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Many small host arrays (a step's plan data, its cached teacher rows) as one
    host-to-device copy: packed into one buffer (pinned on CUDA, so the copy is asynchronous
    and the step waits for nothing), copied with non_blocking=True, viewed back per name.
    PyTorch's pinned-memory cache does not hand a buffer out again before its copy is done."""
    layout, total = [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        layout.append((name, a, total))
        total += -(-a.nbytes // 8) * 8  # 8-byte aligned: every dtype can be viewed in place
    host = torch.empty(max(total, 8), dtype=torch.uint8, pin_memory=device.type == "cuda")
    buf = host.numpy()
    for _, a, at in layout:
        buf[at:at + a.nbytes] = a.reshape(-1).view(np.uint8)
    moved = host.to(device, non_blocking=True)
    return {name: moved[at:at + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape) for name, a, at in layout}
