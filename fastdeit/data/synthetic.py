"""The embedded demo data set: real JPEG files in an ImageFolder tree, generated from a seed.

Ten classes of shapes and textures. Colour, size, position, rotation, background and
clutter are random and carry no class information, so a linear model on raw pixels does
poorly while a small convnet does well. Each image is drawn from its own
numpy generator keyed by (seed, split, class, index): the same seed gives byte-identical
files, and the files can be generated in any order or in parallel.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fastdeit.errors import UserError

CLASSES: tuple[str, ...] = (
    "disk", "square", "triangle", "star", "cross", "ring", "crescent", "stripes", "checker", "dots",
)
WRITING = ".fastdeit-synthetic-writing"  # present while make-data writes
MARKER = ".fastdeit-synthetic.json"


@dataclass(frozen=True)
class SyntheticSet:
    """What to generate. The default is the demo data set."""

    classes: int = 10
    train_per_class: int = 300
    val_per_class: int = 50
    seed: int = 0
    min_size: int = 64
    max_size: int = 96
    quality: int = 90

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _contrasting(rng: np.random.Generator, bg: np.ndarray) -> tuple[int, int, int]:
    # Redraw until the foreground stands out from the mean background: the class must be
    # visible, but its colour must stay uninformative.
    for _ in range(50):
        c = rng.integers(0, 256, size=3)
        if np.abs(c - bg).sum() > 180:
            break
    return tuple(int(v) for v in c)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth two-colour gradient plus pixel noise: no two backgrounds alike."""
    a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(w, h)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    img += rng.normal(0, 12, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int) -> None:
    """Thin random strokes and specks: distractors that belong to no class."""
    for _ in range(int(rng.integers(1, 5))):
        x0, x1 = rng.integers(0, w, size=2)
        y0, y1 = rng.integers(0, h, size=2)
        draw.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=_colour(rng), width=1)
    for _ in range(int(rng.integers(0, 4))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(1, 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_colour(rng))


def _polygon(cx: float, cy: float, radii: list[float], rot: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _shape_mask(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """An L-mode mask of the class's object on a size x size canvas (object roughly centred)."""
    s = size
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    c = s / 2
    r = s * rng.uniform(0.36, 0.48)
    rot = rng.uniform(0, 2 * math.pi)
    if cls == "disk":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif cls == "square":
        d.polygon(_polygon(c, c, [r] * 4, rot), fill=255)
    elif cls == "triangle":
        d.polygon(_polygon(c, c, [r] * 3, rot), fill=255)
    elif cls == "star":
        d.polygon(_polygon(c, c, [r, r * 0.4] * 5, rot), fill=255)
    elif cls == "cross":
        t = r * 0.3
        arm = [(-r, -t), (-t, -t), (-t, -r), (t, -r), (t, -t), (r, -t),
               (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t)]
        cr, sr = math.cos(rot), math.sin(rot)
        d.polygon([(c + x * cr - y * sr, c + x * sr + y * cr) for x, y in arm], fill=255)
    elif cls == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        q = r * 0.55
        d.ellipse([c - q, c - q, c + q, c + q], fill=0)
    elif cls == "crescent":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        off = r * 0.55
        ox, oy = c + off * math.cos(rot), c + off * math.sin(rot)
        d.ellipse([ox - r, oy - r, ox + r, oy + r], fill=0)
    else:
        # Texture classes: a textured square patch; the texture is the class, not the outline.
        tex = Image.new("L", (s * 2, s * 2), 0)
        td = ImageDraw.Draw(tex)
        period = max(6, int(s * rng.uniform(0.2, 0.3)))
        if cls == "stripes":
            for x in range(0, 2 * s, period):
                td.rectangle([x, 0, x + period // 2 - 1, 2 * s], fill=255)
        elif cls == "checker":
            for y in range(0, 2 * s, period):
                for x in range(0, 2 * s, period):
                    if ((x // period) + (y // period)) % 2 == 0:
                        td.rectangle([x, y, x + period - 1, y + period - 1], fill=255)
        elif cls == "dots":
            q = period * 0.3
            for y in range(0, 2 * s, period):
                for x in range(0, 2 * s, period):
                    td.ellipse([x + period / 2 - q, y + period / 2 - q, x + period / 2 + q, y + period / 2 + q],
                               fill=255)
        else:
            raise ValueError(f"unknown synthetic class {cls!r}")
        tex = tex.rotate(math.degrees(rot), resample=Image.Resampling.BILINEAR)
        tex = tex.crop((s // 2, s // 2, s // 2 + s, s // 2 + s))
        window = Image.new("L", (s, s), 0)
        ImageDraw.Draw(window).polygon(_polygon(c, c, [r * 1.25] * 4, rng.uniform(0, 2 * math.pi)), fill=255)
        m = Image.fromarray(np.minimum(np.asarray(tex), np.asarray(window)))
    return m


def render(cls_index: int, rng: np.random.Generator, synthetic: SyntheticSet) -> Image.Image:
    """Draw one image of class `cls_index` from `rng`."""
    w = int(rng.integers(synthetic.min_size, synthetic.max_size + 1))
    h = int(rng.integers(synthetic.min_size, synthetic.max_size + 1))
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, w, h)
    size = int(min(w, h) * rng.uniform(0.6, 0.9))
    mask = _shape_mask(CLASSES[cls_index], size, rng)
    fg = Image.new("RGB", (size, size), _contrasting(rng, np.asarray(img).reshape(-1, 3).mean(0)))
    x = int(rng.integers(0, w - size + 1))
    y = int(rng.integers(0, h - size + 1))
    img.paste(fg, (x, y), mask)
    if rng.uniform() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.7))))
    return img


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _jobs(synthetic: SyntheticSet) -> list[tuple[str, int, int]]:
    jobs = []
    for split, per_class in (("train", synthetic.train_per_class), ("val", synthetic.val_per_class)):
        for c in range(synthetic.classes):
            jobs.extend((split, c, i) for i in range(per_class))
    return jobs


def _split_id(split: str) -> int:
    return 0 if split == "train" else 1


def write_synthetic(
    root: Path, synthetic: SyntheticSet, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write the data set under `root` (train/<class>/*.jpg, val/<class>/*.jpg).

    Files are written to a temporary name and renamed, and a marker file is written last,
    so an interrupted run leaves no half-written image and is simply redone.
    """
    if not 2 <= synthetic.classes <= len(CLASSES):
        raise ValueError(f"--classes must be between 2 and {len(CLASSES)}, got {synthetic.classes}")
    if synthetic.train_per_class < 1 or synthetic.val_per_class < 1:
        raise ValueError("--train-per-class and --val-per-class must be at least 1")
    root = Path(root)
    if is_complete(root, synthetic):
        return root
    if (root / MARKER).exists():
        raise ValueError(f"{root} holds another synthetic data set: pick another folder (nothing was written)")
    if root.is_dir() and any(root.iterdir()) and not (root / WRITING).exists():
        raise ValueError(f"{root} is not empty and was not written by make-data: pick an empty or new folder "
                         f"(nothing was written)")
    root.mkdir(parents=True, exist_ok=True)
    (root / WRITING).touch()  # a write cut short is ours to finish
    jobs = _jobs(synthetic)

    def one(job: tuple[str, int, int]) -> None:
        split, c, i = job
        rng = np.random.default_rng(np.random.SeedSequence([synthetic.seed, _split_id(split), c, i]))
        data = _encode(render(c, rng, synthetic), synthetic.quality)
        folder = root / split / f"{c:02d}_{CLASSES[c]}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        tmp = path.with_suffix(".jpg.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write {path} ({e.strerror}): free some space, then run the same command "
                            f"(it finishes what is missing)") from None

    done = 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(one, jobs):
            done += 1
            if progress is not None:
                progress(done, len(jobs))
    (root / MARKER).write_text(json.dumps(synthetic.to_json(), indent=1))
    (root / WRITING).unlink()
    return root


def is_complete(root: Path, synthetic: SyntheticSet) -> bool:
    """True when `root` holds exactly this synthetic set (its marker is written last)."""
    marker = Path(root) / MARKER
    try:
        return json.loads(marker.read_text()) == synthetic.to_json()
    except (OSError, ValueError):
        return False
