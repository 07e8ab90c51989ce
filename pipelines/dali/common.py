"""What the DALI graphs share: whether DALI is installed, the CUDA major of its wheel, the
resampling names, and a DALI batch handed to torch."""

from __future__ import annotations

import torch

try:  # DALI is a Linux-only dependency; everything else works without it.
    from nvidia.dali import fn, types
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError:  # pragma: no cover - exercised only where DALI is absent
    fn = None


def available() -> bool:
    return fn is not None


def cuda_major() -> int | None:
    """The CUDA major version the installed DALI wheel was built for (nvidia-dali-cuda130: 13)."""
    import importlib.metadata

    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali-cuda") and name[16:].isdigit():
            return int(name[16:]) // 10
    return None


def interp(name: str):
    return {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[name]



def to_torch(out, device: torch.device) -> torch.Tensor:
    """DALI uint8 NHWC batch -> torch NCHW view, copied once into torch memory (no host
    round-trip on the GPU)."""
    dense = out.as_tensor()
    t = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
    feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return t.permute(0, 3, 1, 2)
