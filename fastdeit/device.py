"""The device a process computes on, and the autocast dtype it computes in."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from fastdeit.config import Amp, Device
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
