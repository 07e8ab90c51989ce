"""DeiT III's simple random crop in the DALI graph: resize the shorter side to the image size,
pad SRC_PAD reflected pixels on every side, take the plan's window.

DALI's slice pads only with a constant, so the reflected border is built from the image's
own edge strips: columns 1..P flipped go left of column 0, columns W-1-P..W-2 flipped go right
of column W-1 (numpy's and torchvision's 'reflect', which does not repeat the edge), then the
same for rows. The host gives each sample's resized size and strip starts (`src_params`).
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn

from fastdeit.data.plan import SRC_PAD, src_resized

SRC_NAMES = ("src.size", "src.far_w", "src.far_h", "src.window")  # src_params' outputs, in the source's order


def src_params(sizes: np.ndarray, window: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Per sample of (width, height) `sizes` and plan windows (top, left): the resized (H, W),
    the far strips' starts along W and H, and the window's start in (x, y) order."""
    resized = src_resized(sizes, size)
    return {"src.size": resized.astype(np.float32),
            "src.far_w": (resized[:, 1:] - 1 - SRC_PAD).astype(np.int32),
            "src.far_h": (resized[:, :1] - 1 - SRC_PAD).astype(np.int32),
            "src.window": window[:, ::-1].astype(np.int32).copy()}


def _reflect(img, far, axis: str):
    """`img` with SRC_PAD reflected pixels added at both ends of `axis` ("W" or "H")."""
    flip = {"horizontal": 1} if axis == "W" else {"horizontal": 0, "vertical": 1}  # horizontal is on by default
    near = fn.flip(fn.slice(img, start=[1], shape=[SRC_PAD], axis_names=axis), **flip)
    end = fn.flip(fn.slice(img, start=far, shape=[SRC_PAD], axis_names=axis), **flip)
    return fn.cat(near, img, end, axis_name=axis)


def simple_crop(img, inputs: dict, size: int, interp_type):
    """The plan's simple random crop of decoded images, given `src_params`' outputs by name."""
    img = fn.resize(img, size=inputs["src.size"], interp_type=interp_type, antialias=True)
    img = _reflect(img, inputs["src.far_w"], "W")
    img = _reflect(img, inputs["src.far_h"], "H")
    return fn.slice(img, start=inputs["src.window"], shape=[size, size], axis_names="WH")
