import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdeit.data.synthetic import CLASSES, SyntheticSet, is_complete, write_synthetic

SMALL = SyntheticSet(classes=10, train_per_class=40, val_per_class=20, seed=11)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_gives_byte_identical_files(tmp_path):
    spec = SyntheticSet(classes=3, train_per_class=5, val_per_class=2, seed=4)
    a = tree_digest(write_synthetic(tmp_path / "a", spec))
    b = tree_digest(write_synthetic(tmp_path / "b", spec))
    c = tree_digest(write_synthetic(tmp_path / "c", SyntheticSet(classes=3, train_per_class=5, val_per_class=2)))
    assert len(a) == 21 and a == b and a != c
    assert is_complete(tmp_path / "a", spec) and not is_complete(tmp_path / "a", SMALL)


def test_real_jpegs_of_varied_sizes(tiny_data):
    files = sorted((tiny_data / "train").rglob("*.jpg"))
    sizes = set()
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.add(img.size)
    assert len(sizes) > 20 and any(w != h for w, h in sizes)
    assert all(64 <= w <= 96 and 64 <= h <= 96 for w, h in sizes)
    assert [d.name for d in sorted((tiny_data / "train").iterdir())] == [f"{i:02d}_{CLASSES[i]}" for i in range(3)]


def pixels(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for label, folder in enumerate(sorted((root / split).iterdir())):
        for f in sorted(folder.glob("*.jpg")):
            with Image.open(f) as img:
                xs.append(np.asarray(img.convert("RGB").resize((24, 24)), np.float32).ravel() / 255)
            ys.append(label)
    x = torch.from_numpy(np.stack(xs))
    return x, torch.tensor(ys)


def test_a_linear_probe_on_pixels_does_poorly(tmp_path):
    """Colour, position, size and background carry no class information: a linear
    classifier on raw pixels stays near chance (10%), where a convnet reaches high accuracy."""
    root = write_synthetic(tmp_path / "d", SMALL)
    xt, yt = pixels(root, "train")
    xv, yv = pixels(root, "val")
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    xt, xv = (xt - mean) / std, (xv - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(xt.shape[1], 10)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(xt), yt).backward()
        opt.step()
    train_acc = (probe(xt).argmax(1) == yt).float().mean().item()
    val_acc = (probe(xv).argmax(1) == yv).float().mean().item()
    assert train_acc > 0.9  # the probe did fit (memorised) the training set...
    assert val_acc < 0.3  # ...and does not generalise
