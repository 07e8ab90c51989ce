"""RandAugment (and DeiT III's 3-Augment) with DALI operators, driven by the plan instead of
DALI's RNG.

The host turns each (op, argument) of the plan into one of a few DALI kinds plus its
parameters (`layer_params`): the five geometric ops become one inverse affine matrix in
PIL's convention (so rotate, shear and translate land where PIL puts them), the colour ops a
scalar. The graph (`apply_layer`) picks each sample's branch with DALI conditionals. One
table names the branches (`BRANCHES`, whose order numbers the kinds) and one maps timm's op
names to them (`_BY_OP`): a new op is a row in the second, a new branch a row in the first.

Known differences from the PIL reference (bounded in the parity tests): DALI's warp_affine
interpolates bilinearly where timm asks PIL for bicubic; Equalize follows OpenCV's lookup
table rather than PIL's; rounding of blends can differ by one level.
"""

from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from fastdeit.pipelines.batch import FILL

# timm's op names -> the DALI branch (`BRANCHES`, at the end) that runs them.
_BY_OP = {"ShearX": "affine", "ShearY": "affine", "TranslateXRel": "affine", "TranslateYRel": "affine",
          "Rotate": "affine", "AutoContrast": "autocontrast", "Equalize": "equalize", "Invert": "invert",
          "Posterize": "posterize", "PosterizeIncreasing": "posterize", "Solarize": "solarize",
          "SolarizeIncreasing": "solarize", "SolarizeAdd": "solarize_add", "Color": "color",
          "ColorIncreasing": "color", "Contrast": "contrast", "ContrastIncreasing": "contrast",
          "Brightness": "brightness", "BrightnessIncreasing": "brightness", "Sharpness": "sharpness",
          "SharpnessIncreasing": "sharpness"}
_IDENTITY = np.array([[1, 0, 0], [0, 1, 0]], np.float32)


def affine_matrix(name: str, arg: float, size: int) -> np.ndarray:
    """The inverse map (output -> input pixel coordinates) PIL applies for this op on a
    size x size image; timm's translate_*_rel, shear_* and rotate."""
    if name == "ShearX":
        return np.array([[1, arg, 0], [0, 1, 0]], np.float32)
    if name == "ShearY":
        return np.array([[1, 0, 0], [arg, 1, 0]], np.float32)
    if name == "TranslateXRel":
        return np.array([[1, 0, arg * size], [0, 1, 0]], np.float32)
    if name == "TranslateYRel":
        return np.array([[1, 0, 0], [0, 1, arg * size]], np.float32)
    if name == "Rotate":  # PIL Image.rotate(angle) about the centre, expand=False
        a = -math.radians(arg)
        c, s = round(math.cos(a), 15), round(math.sin(a), 15)
        centre = size / 2.0
        tx = c * -centre + s * -centre + centre
        ty = -s * -centre + c * -centre + centre
        return np.array([[c, s, tx], [-s, c, ty]], np.float32)
    raise ValueError(f"{name} is not a geometric op")


def layer_params(names: tuple[str, ...], ops: np.ndarray, args: np.ndarray,
                 size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one RandAugment layer of a batch: DALI kind [b] int32 (the branch's number in
    `KINDS`), affine matrix [b, 2, 3] and scalar [b] float32 (posterize: the bit mask to keep;
    solarize: the threshold; solarize-add: the increment; enhance ops: the blend factor)."""
    b = len(ops)
    kind = np.zeros(b, np.int32)
    mat = np.repeat(_IDENTITY[None], b, axis=0)
    scalar = np.zeros(b, np.float32)
    for i, (op, arg) in enumerate(zip(ops, args)):
        if op < 0:
            continue
        name = names[op]
        branch = _BY_OP[name]
        kind[i] = _KIND[branch]
        if branch == "affine":
            mat[i] = affine_matrix(name, float(arg), size)
        elif branch == "posterize":
            bits = int(arg)
            scalar[i] = 255 if bits >= 8 else (255 ^ (2 ** (8 - bits) - 1)) & 255
        else:
            scalar[i] = float(arg)
    return kind, mat, scalar


# --- graph side: x is a uint8 HWC batch; mat and scalar are per-sample CPU nodes ----------------


def _to_u8(x, device: str):
    """float -> uint8 the way PIL stores blends: truncate, then clamp."""
    return fn.cast(dmath.clamp(dmath.floor(x), 0.0, 255.0), dtype=types.UINT8)


def _float(x):
    return fn.cast(x, dtype=types.FLOAT)


def _blend(degenerate, x, factor, device):
    """PIL's Image.blend(degenerate, x, factor) = degenerate + factor * (x - degenerate)."""
    return _to_u8(degenerate + (_float(x) - degenerate) * factor, device)


def _gray(x):
    return _float(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY))


def _affine(x, mat, scalar, device, size):
    fill = types.Constant(np.array(FILL, np.float32), device=device)
    # warp_affine fills with one value: shift the fill colour to zero, warp, shift back.
    out = fn.warp_affine(_float(x) - fill, matrix=mat, fill_value=0.0, interp_type=types.INTERP_LINEAR,
                         inverse_map=True) + fill
    return fn.cast(dmath.clamp(dmath.floor(out + 0.5), 0.0, 255.0), dtype=types.UINT8)


def _autocontrast(x, mat, scalar, device, size):
    lo = _float(fn.reductions.min(x, axis_names="HW", keep_dims=True))
    hi = _float(fn.reductions.max(x, axis_names="HW", keep_dims=True))
    span = hi - lo
    flat = span <= 0
    scale = 255.0 / (span + flat)  # flat channels (hi == lo) are left as they are
    out = (_float(x) - lo) * scale * (flat ^ True) + _float(x) * flat
    return _to_u8(out, device)


def _equalize(x, mat, scalar, device, size):
    return fn.equalize(x)


def _invert(x, mat, scalar, device, size):
    return types.Constant(255, dtype=types.UINT8, device=device) - x


def _posterize(x, mat, scalar, device, size):
    return x & fn.cast(scalar, dtype=types.UINT8)


def _solarized(x, threshold, device):
    """PIL's ImageOps.solarize: values at or above the threshold inverted."""
    keep = _float(x) < threshold
    return _to_u8(_float(x) * keep + (255.0 - _float(x)) * (keep ^ True), device)


def _solarize(x, mat, scalar, device, size):
    return _solarized(x, scalar, device)


def _solarize_add(x, mat, scalar, device, size):
    low = x < types.Constant(128, dtype=types.UINT8, device=device)
    return _to_u8(_float(x) + scalar * low, device)


def _color(x, mat, scalar, device, size):
    return _blend(_gray(x), x, scalar, device)


def _contrast(x, mat, scalar, device, size):
    mean = dmath.floor(fn.reductions.mean(_gray(x), axis_names="HWC", keep_dims=True) + 0.5)
    return _blend(mean, x, scalar, device)


def _brightness(x, mat, scalar, device, size):
    return _to_u8(_float(x) * scalar, device)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def _sharpness(x, mat, scalar, device, size):
    # PIL's ImageFilter.SMOOTH, rounded to uint8, with the 1-pixel border left unfiltered.
    blur = dmath.floor(fn.filter(_float(x), types.Constant(_SMOOTH, device=device)) + 0.5)
    border = np.ones((size, size, 1), np.float32)
    border[1:-1, 1:-1] = 0
    inner = types.Constant(border, device=device)
    degenerate = _float(x) * inner + blur * (1.0 - inner)
    return _blend(degenerate, x, scalar, device)


# Each branch by name; its position is the kind number the host sends (0, identity: no op).
BRANCHES = {"identity": lambda x, *_: x, "affine": _affine, "autocontrast": _autocontrast, "equalize": _equalize,
            "invert": _invert, "posterize": _posterize, "solarize": _solarize, "solarize_add": _solarize_add,
            "color": _color, "contrast": _contrast, "brightness": _brightness, "sharpness": _sharpness}
KINDS = tuple(BRANCHES)
_KIND = {name: k for k, name in enumerate(KINDS)}


def _select(lo: int, hi: int, kind, x, mat, scalar, device, size):
    """Binary split of the batch by kind (DALI conditionals): each sample runs its own op."""
    if lo == hi:
        return BRANCHES[KINDS[lo]](x, mat, scalar, device, size)
    mid = (lo + hi) // 2
    if kind <= mid:
        out = _select(lo, mid, kind, x, mat, scalar, device, size)
    else:
        out = _select(mid + 1, hi, kind, x, mat, scalar, device, size)
    return out


# 3-Augment's ColorJitter factors (plan.JITTER's order) as the enhance ops PIL runs for them
# (torchvision's adjust_brightness, adjust_contrast and adjust_saturation on a PIL image).
JITTER_OPS = ("Brightness", "Contrast", "Color")


def jitter_params(jitter: np.ndarray, order: np.ndarray, k: int, size: int):
    """`layer_params` of 3-Augment's k-th colour op: each sample's order[k]-th factor (a
    factor of 1 changes nothing and runs no op, as in the reference)."""
    which = order[:, k].astype(np.int64)
    factor = jitter[np.arange(len(which)), which]
    return layer_params(JITTER_OPS, np.where(factor != 1.0, which, -1), factor, size)


def apply_three(x, op, radius, device: str):
    """3-Augment's first op, per sample (plan.THREE_OPS): grayscale (PIL's L, in 3 channels),
    solarize at 128, or a Gaussian blur of the plan's radius (the sigma PIL's GaussianBlur
    takes its radius for; DALI's is a true Gaussian where PIL's is three box passes)."""
    if op == 0:
        gray = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
        out = fn.cat(gray, gray, gray, axis=2)
    elif op == 1:
        out = _solarized(x, 128.0, device)
    else:
        out = fn.gaussian_blur(x, sigma=radius)
    return out


def apply_layer(x, kind, mat, scalar, device: str, size: int):
    """One RandAugment layer: every sample runs the op its kind names (0 = none)."""
    if device == "gpu":
        scalar = scalar.gpu()
    return _select(0, len(KINDS) - 1, kind, x, mat, scalar, device, size)
