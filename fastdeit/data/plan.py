"""The augmentation plan: every random decision of a training batch, keyed by (seed, epoch, step).

`make_plan` is a pure function of (PlanSpec, source image sizes, epoch, step). It does not
depend on the world size, the backend, the device or the wall clock: the global batch is
drawn whole and ranks take whole mix groups of it (`BatchPlan.shard`). Same plan means the
same geometry on every pipeline and the same cached teacher targets, which is what makes
resume exact, the backends comparable and the teacher cache valid.

The draws follow timm/torchvision semantics (RandomResizedCrop, RandAugment, RandomErasing,
Mixup in batch mode; DeiT III's 3-Augment), with the randomness taken from the plan instead of
Python's RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

from fastdeit.config.randaugment import RandAugmentParams, parse_rand_augment
from fastdeit.config.schema import AugConfig, TrainConfig
from fastdeit.errors import UserError

# timm's RandAugment transform sets (_RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS), in order.
RA_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
          "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
          "TranslateYRel")
RA_OPS_INC = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
              "TranslateYRel")
_ATTEMPTS = 10  # torchvision's RandomResizedCrop and timm's RandomErasing try 10 boxes
THREE_OPS = ("grayscale", "solarize", "blur")  # 3-Augment: one of them per sample (the official RandomChoice)
JITTER = ("brightness", "contrast", "saturation")  # ColorJitter's factors, applied in a random order
SRC_PAD = 4  # the simple random crop's reflected border (the official RandomCrop(padding=4, 'reflect'))
_TAG_ORDER, _TAG_STEP = 0, 1


@dataclass(frozen=True)
class PlanSpec:
    """Everything a plan depends on besides (epoch, step) and the source image sizes."""

    seed: int
    img_size: int
    batch_size: int
    aug: AugConfig

    def __post_init__(self) -> None:
        if self.batch_size % self.aug.mix_group:
            raise ValueError(f"batch {self.batch_size} is not a whole number of mix groups of {self.aug.mix_group}")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PlanSpec:
        return cls(seed=cfg.run.seed, img_size=cfg.data.img_size, batch_size=cfg.run.batch_size, aug=cfg.aug)

    @property
    def rand_augment(self) -> RandAugmentParams | None:
        return parse_rand_augment(self.aug.rand_augment) if self.aug.rand_augment else None

    @property
    def ra_ops(self) -> tuple[str, ...]:
        ra = self.rand_augment
        return RA_OPS_INC if ra is not None and ra.increasing else RA_OPS

    def to_json(self) -> dict:
        """What a plan depends on, as caches and checkpoints record it. Keys added after those
        records began appear only where they change the plan, so older records stay valid."""
        aug = {f.name: getattr(self.aug, f.name) for f in fields(self.aug)}
        # Keys added later -> whether this plan leaves them out (they are off).
        later = {"three_augment": not self.aug.three_augment, "color_jitter": not self.aug.three_augment,
                 "simple_crop": not self.aug.simple_crop}
        aug = {k: v for k, v in aug.items() if not later.get(k, False)}
        return {"seed": self.seed, "img_size": self.img_size, "batch_size": self.batch_size, "aug": aug}


@dataclass(frozen=True)
class BatchPlan:
    """Plain arrays, one row per sample of a (global or per-rank) batch.

    crop: (left, top, width, height) in source pixels (the whole image under the simple random
    crop, whose window `src` is (top, left) in the image resized by `src_resized` and padded
    by SRC_PAD reflected pixels; -1 where it is off); ra_op: index into PlanSpec.ra_ops or -1;
    erase: (top, left, height, width) in output pixels, height 0 = none; lam: weight of the
    sample's own image after mixing (cutmix-corrected); box: the group's cutmix box
    (y0, y1, x0, x1); partner: row of the mixing partner within this plan. 3-Augment:
    three_op indexes THREE_OPS (-1: off), blur the Gaussian radius, jitter the JITTER factors
    (1: unchanged), jitter_order the order they apply in.
    """

    seed: int
    epoch: int
    step: int
    group: int  # rows per mix group: groups are contiguous and share lam, cutmix and box
    pos: np.ndarray
    index: np.ndarray
    crop: np.ndarray
    flip: np.ndarray
    ra_op: np.ndarray
    ra_arg: np.ndarray
    erase: np.ndarray
    lam: np.ndarray
    cutmix: np.ndarray
    box: np.ndarray
    partner: np.ndarray
    three_op: np.ndarray  # [b] int8
    blur: np.ndarray  # [b] float32
    jitter: np.ndarray  # [b, 3] float32
    jitter_order: np.ndarray  # [b, 3] int8
    src: np.ndarray  # [b, 2] int32

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, lo: int, hi: int) -> BatchPlan:
        """Rows [lo, hi): their mixing partners inside (whole mix groups where mixup or cutmix
        pairs rows; any rows where they are off, and every row is its own partner)."""
        arrays = {f.name: getattr(self, f.name)[lo:hi] for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        arrays["partner"] = self.partner[lo:hi] - lo
        if len(arrays["partner"]) and (arrays["partner"].min() < 0 or arrays["partner"].max() >= hi - lo):
            raise ValueError("a shard must hold whole mix groups")
        return BatchPlan(seed=self.seed, epoch=self.epoch, step=self.step, group=self.group, **arrays)

    def shard(self, rank: int, world: int) -> BatchPlan:
        per = len(self) // world
        return self.rows(rank * per, (rank + 1) * per)


def steps_per_epoch(spec: PlanSpec, num_samples: int) -> int:
    """Whole global batches per epoch; the last partial batch is dropped (static shapes)."""
    steps = num_samples // spec.batch_size
    if steps == 0:
        raise UserError(f"the training set has {num_samples} images, fewer than one global batch "
                        f"({spec.batch_size}): lower --batch-size")
    return steps


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_samples: int, repeats: int) -> np.ndarray:
    """The epoch's sample sequence: a permutation, each index `repeats` times in a row
    (DeiT's repeated augmentation), as long as the data set."""
    rng = np.random.default_rng([seed, _TAG_ORDER, epoch])
    perm = rng.permutation(num_samples)
    if repeats > 1:
        perm = np.repeat(perm, repeats)[:num_samples]
    perm.setflags(write=False)
    return perm


def make_plan(spec: PlanSpec, sizes: np.ndarray, epoch: int, step: int) -> BatchPlan:
    """The global batch plan of (epoch, step). `sizes` holds (width, height) of every source image."""
    n = len(sizes)
    b = spec.batch_size
    s = spec.img_size
    a = spec.aug
    if not 0 <= step < steps_per_epoch(spec, n):
        raise ValueError(f"step {step} is outside epoch of {steps_per_epoch(spec, n)} steps")
    chunk = epoch_order(spec.seed, epoch, n, a.repeated_aug)[step * b:(step + 1) * b]
    if a.repeated_aug > 1:
        # Spread the copies of one image across the batch (the official sampler sends them to
        # different GPUs): copies land b/repeats rows apart, in different mix groups.
        chunk = chunk[np.argsort(np.arange(b) % a.repeated_aug, kind="stable")]
    rng = np.random.default_rng([spec.seed, _TAG_STEP, epoch, step])
    crop = _crops(rng, sizes[chunk], a.scale, a.ratio)
    flip = rng.random(b) < a.hflip
    ra_op, ra_arg = _rand_augment(rng, b, spec.rand_augment)
    erase = _erasing(rng, b, s, a.reprob)
    lam, cutmix, box, partner = _mixing(rng, b, s, a)
    three_op, blur, jitter, jitter_order = _three_augment(rng, b, a)  # drawn last: the other draws stay as they were
    src = _simple_crop(rng, sizes[chunk], s) if a.simple_crop else np.full((b, 2), -1, np.int32)  # drawn after it
    if a.simple_crop:
        crop = np.concatenate([np.zeros((b, 2), np.int32), sizes[chunk].astype(np.int32)], axis=1)
    return BatchPlan(seed=spec.seed, epoch=epoch, step=step, group=a.mix_group,
                     pos=step * b + np.arange(b, dtype=np.int64),
                     index=chunk.astype(np.int64), crop=crop, flip=flip, ra_op=ra_op, ra_arg=ra_arg,
                     erase=erase, lam=lam, cutmix=cutmix, box=box, partner=partner, three_op=three_op, blur=blur,
                     jitter=jitter, jitter_order=jitter_order, src=src)


def _crops(rng: np.random.Generator, sizes: np.ndarray, scale: tuple, ratio: tuple) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params, vectorised: first valid of 10 tries, else centre."""
    b = len(sizes)
    width = np.maximum(sizes[:, 0], 1).astype(np.float64)[:, None]
    height = np.maximum(sizes[:, 1], 1).astype(np.float64)[:, None]
    target = width * height * rng.uniform(scale[0], scale[1], (b, _ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (b, _ATTEMPTS)))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    u = rng.random((b, _ATTEMPTS, 2))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(ok, axis=1)
    rows = np.arange(b)
    w = w[rows, first]
    h = h[rows, first]
    u = u[rows, first]
    width, height = width[:, 0], height[:, 0]
    top = np.floor(u[:, 0] * (height - h + 1))
    left = np.floor(u[:, 1] * (width - w + 1))
    # Fallback: the largest centred crop inside the ratio bounds.
    in_ratio = width / height
    fw = np.where(in_ratio < ratio[0], width, np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width))
    fh = np.where(in_ratio < ratio[0], np.round(width / ratio[0]),
                  np.where(in_ratio > ratio[1], height, height))
    found = ok.any(axis=1)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    top = np.where(found, top, (height - h) // 2)
    left = np.where(found, left, (width - w) // 2)
    return np.stack([left, top, w, h], axis=1).astype(np.int32)


def _rand_augment(rng: np.random.Generator, b: int, ra: RandAugmentParams | None) -> tuple[np.ndarray, np.ndarray]:
    if ra is None or ra.num_layers == 0:
        return np.full((b, 0), -1, np.int8), np.zeros((b, 0), np.float32)
    n = ra.num_layers
    op = rng.integers(0, len(RA_OPS), (b, n))
    apply = rng.random((b, n)) <= ra.prob
    if math.isinf(ra.magnitude_std):
        mag = rng.uniform(0, ra.magnitude, (b, n))
    elif ra.magnitude_std > 0:
        mag = rng.normal(ra.magnitude, ra.magnitude_std, (b, n))
    else:
        mag = np.full((b, n), ra.magnitude)
    mag = np.clip(mag, 0.0, ra.magnitude_max)
    negate = rng.random((b, n)) > 0.5
    arg = np.zeros((b, n), np.float64)
    for k in range(len(RA_OPS)):
        sel = op == k
        arg[sel] = level_to_arg(k, mag[sel], negate[sel], ra.increasing)
    return np.where(apply, op, -1).astype(np.int8), arg.astype(np.float32)


def level_to_arg(op: int, mag: np.ndarray, negate: np.ndarray, increasing: bool) -> np.ndarray:
    """timm's LEVEL_TO_ARG for the RandAugment set, with the sign taken from the plan."""
    level = mag / 10.0
    sign = np.where(negate, -1.0, 1.0)
    name = RA_OPS[op]
    if name in ("AutoContrast", "Equalize", "Invert"):
        return np.zeros_like(level)
    if name == "Rotate":
        return sign * level * 30.0
    if name == "Posterize":
        bits = np.floor(level * 4)
        return 4 - bits if increasing else bits
    if name == "Solarize":
        thresh = np.minimum(256, np.floor(level * 256))
        return 256 - thresh if increasing else thresh
    if name == "SolarizeAdd":
        return np.minimum(128, np.floor(level * 110))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return np.maximum(0.1, 1.0 + sign * level * 0.9) if increasing else level * 1.8 + 0.1
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    return sign * level * 0.45  # TranslateXRel / TranslateYRel, timm's translate_pct


def _erasing(rng: np.random.Generator, b: int, s: int, prob: float) -> np.ndarray:
    """timm RandomErasing (one box, 'pixel' mode) box choice, vectorised over the batch."""
    on = rng.random(b) < prob
    target = s * s * rng.uniform(0.02, 1 / 3, (b, _ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3), (b, _ATTEMPTS)))
    h = np.round(np.sqrt(target * aspect))
    w = np.round(np.sqrt(target / aspect))
    u = rng.random((b, _ATTEMPTS, 2))
    ok = (w < s) & (h < s)
    first = np.argmax(ok, axis=1)
    rows = np.arange(b)
    h = h[rows, first]
    w = w[rows, first]
    u = u[rows, first]
    top = np.floor(u[:, 0] * (s - h + 1))
    left = np.floor(u[:, 1] * (s - w + 1))
    keep = on & ok.any(axis=1)
    box = np.stack([top, left, h, w], axis=1) * keep[:, None]
    return box.astype(np.int32)


def _mixing(rng: np.random.Generator, b: int, s: int, a: AugConfig):
    """timm Mixup in batch mode, one draw per mix group; partners are the group reversed."""
    g = a.mix_group
    groups = b // g
    use_cutmix = np.zeros(groups, bool)
    if a.mixup > 0 and a.cutmix > 0:
        use_cutmix = rng.random(groups) < a.switch_prob
    elif a.cutmix > 0:
        use_cutmix[:] = True
    lam_mix = rng.beta(a.mixup, a.mixup, groups) if a.mixup > 0 else np.ones(groups)
    lam_cut = rng.beta(a.cutmix, a.cutmix, groups) if a.cutmix > 0 else np.ones(groups)
    lam = np.where(use_cutmix, lam_cut, lam_mix)
    cut = (s * np.sqrt(1 - lam)).astype(np.int64)
    cy = rng.integers(0, s, groups)
    cx = rng.integers(0, s, groups)
    y0, y1 = np.clip(cy - cut // 2, 0, s), np.clip(cy + (cut + 1) // 2, 0, s)
    x0, x1 = np.clip(cx - cut // 2, 0, s), np.clip(cx + (cut + 1) // 2, 0, s)
    lam = np.where(use_cutmix, 1.0 - (y1 - y0) * (x1 - x0) / float(s * s), lam)
    box = np.stack([y0, y1, x0, x1], axis=1) * use_cutmix[:, None]
    mixing = a.mixup > 0 or a.cutmix > 0
    within = np.arange(g)[::-1] if mixing else np.arange(g)
    partner = (np.arange(groups)[:, None] * g + within[None, :]).reshape(-1)
    return (np.repeat(lam, g).astype(np.float32), np.repeat(use_cutmix, g),
            np.repeat(box, g, axis=0).astype(np.int32), partner.astype(np.int64))


def _three_augment(rng: np.random.Generator, b: int, a: AugConfig) -> tuple[np.ndarray, ...]:
    """DeiT III's 3-Augment (official augment.py): one of THREE_OPS per sample, the blur's
    radius uniform in [0.1, 2], then torchvision's ColorJitter(cj, cj, cj): each factor uniform
    in [max(0, 1 - cj), 1 + cj], applied in a random order. Nothing is drawn where it is off."""
    order = np.tile(np.arange(3, dtype=np.int8), (b, 1))
    if not a.three_augment:
        return np.full(b, -1, np.int8), np.zeros(b, np.float32), np.ones((b, 3), np.float32), order
    op = rng.integers(0, len(THREE_OPS), b).astype(np.int8)
    radius = rng.uniform(0.1, 2.0, b).astype(np.float32)
    cj = a.color_jitter
    jitter = rng.uniform(max(0.0, 1.0 - cj), 1.0 + cj, (b, 3)) if cj > 0 else np.ones((b, 3))
    order = np.argsort(rng.random((b, 3)), axis=1).astype(np.int8)
    return op, radius, jitter.astype(np.float32), order


def src_resized(sizes: np.ndarray, s: int) -> np.ndarray:
    """(height, width) of images of (width, height) `sizes` after torchvision's Resize(s): the
    shorter side becomes s, the longer int(s * longer / shorter)."""
    w = np.maximum(sizes[:, 0], 1).astype(np.int64)
    h = np.maximum(sizes[:, 1], 1).astype(np.int64)
    short = np.minimum(w, h)
    longer = (s * np.maximum(w, h) / short).astype(np.int64)
    return np.stack([np.where(w <= h, longer, s), np.where(w <= h, s, longer)], axis=1)


def _simple_crop(rng: np.random.Generator, sizes: np.ndarray, s: int) -> np.ndarray:
    """The official RandomCrop(s, padding=SRC_PAD) after Resize(s): (top, left) uniform over the
    windows of the padded image."""
    room = src_resized(sizes, s) + 2 * SRC_PAD - s + 1
    return rng.integers(0, room).astype(np.int32)
