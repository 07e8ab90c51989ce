"""timm's RandAugment grammar (`rand-m9-mstd0.5-inc1`), parsed into the parameters the plan draws with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastdeit.errors import UserError


@dataclass(frozen=True)
class RandAugmentParams:
    """A parsed timm RandAugment string such as rand-m9-mstd0.5-inc1."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    increasing: bool = False


def parse_rand_augment(text: str) -> RandAugmentParams:
    """Parse timm's RandAugment grammar (m, n, p, mstd, mmax, inc); weighted sets are not supported."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise UserError(f"aug.rand_augment must start with 'rand-', got {text!r}")
    params: dict[str, Any] = {}
    names = {"m": "magnitude", "n": "num_layers", "p": "prob", "mstd": "magnitude_std",
             "mmax": "magnitude_max", "inc": "increasing"}
    for part in parts[1:]:
        key = part.rstrip("0123456789.")
        num = part[len(key):]
        if key not in names or not num:
            raise UserError(f"aug.rand_augment: cannot read {part!r} in {text!r} (known: m, n, p, mstd, mmax, inc)")
        try:
            val = float(num)
        except ValueError:
            raise UserError(f"aug.rand_augment: {part!r} in {text!r} is not a number") from None
        if key == "mstd" and val > 100:
            val = float("inf")  # timm: mstd > 100 means uniform sampling in [0, m]
        params[names[key]] = int(val) if key == "n" else bool(int(val)) if key == "inc" else val
    out = RandAugmentParams(**params)
    if out.num_layers < 0 or not 0 <= out.prob <= 1 or out.magnitude < 0:
        raise UserError(f"aug.rand_augment {text!r}: n must be >= 0, p in [0, 1], m >= 0")
    return out
