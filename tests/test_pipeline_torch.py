from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp
from torchvision import transforms as T

from fastdeit.config.schema import AugConfig
from fastdeit.data.folder import scan_split
from fastdeit.data.plan import RA_OPS, RA_OPS_INC, PlanSpec, level_to_arg, make_plan
from fastdeit.pipelines.reference import FILL, augment, decode, eval_loader, load_plan_rows, train_loader


def marker_image(path: Path, w: int, h: int, mx: int, my: int) -> None:
    a = np.full((h, w, 3), 40, np.uint8)
    a[my - 2:my + 3, mx - 2:mx + 3] = 255
    Image.fromarray(a).save(path, quality=98)


@pytest.fixture
def marker_data(tmp_path: Path) -> tuple[Path, list[tuple[int, int]]]:
    rng = np.random.default_rng(0)
    marks = []
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(16):
            w, h = int(rng.integers(120, 200)), int(rng.integers(120, 200))
            mx, my = int(rng.integers(40, w - 40)), int(rng.integers(40, h - 40))
            marker_image(tmp_path / "train" / c / f"{i:02d}.jpg", w, h, mx, my)
            marks.append((mx, my))
        marker_image(tmp_path / "val" / c / "0.jpg", 150, 120, 75, 60)
    return tmp_path, marks


def spec(**aug) -> PlanSpec:
    base = dict(mix_group=8, rand_augment="", reprob=0.0, mixup=0.0, cutmix=0.0, repeated_aug=1, scale=(0.3, 1.0))
    return PlanSpec(seed=1, img_size=64, batch_size=32, aug=replace(AugConfig(), **{**base, **aug}))


def test_same_plan_same_batch(tiny_data):
    index = scan_split(tiny_data, "train")
    s = PlanSpec(seed=2, img_size=32, batch_size=16, aug=AugConfig(mix_group=8))
    plan = make_plan(s, index.sizes, 0, 1)
    a, b = load_plan_rows(index, s, plan), load_plan_rows(index, s, plan)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.dtype == torch.uint8 and a.images.shape == (16, 3, 32, 32)
    assert torch.equal(a.labels, torch.from_numpy(index.labels[plan.index]))


def test_crop_and_flip_put_the_marker_where_the_plan_says(marker_data):
    root, marks = marker_data
    index = scan_split(root, "train")
    s = spec()
    plan = make_plan(s, index.sizes, 0, 0)
    out = load_plan_rows(index, s, plan).images.float().mean(1)  # [b, S, S]
    checked = 0
    for i in range(len(plan)):
        left, top, w, h = plan.crop[i]
        mx, my = marks[plan.index[i]]
        if not (left + 3 <= mx < left + w - 3 and top + 3 <= my < top + h - 3):
            continue  # the crop cut the marker off
        ex = (mx + 0.5 - left) * 64 / w - 0.5
        ey = (my + 0.5 - top) * 64 / h - 0.5
        if plan.flip[i]:
            ex = 63 - ex
        yy, xx = np.unravel_index(int(out[i].argmax()), (64, 64))
        assert abs(xx - ex) <= 1.5 and abs(yy - ey) <= 1.5, (i, (xx, yy), (ex, ey))
        checked += 1
    assert checked >= 16 and plan.flip.any() and (~plan.flip).any()


@pytest.mark.parametrize("increasing", [True, False])
def test_rand_augment_ops_equal_timms_augment_op(tiny_data, increasing):
    """Each op with the plan's argument gives timm's AugmentOp output for that magnitude
    (timm draws the sign itself: one of our two signs must match it)."""
    img = augment(decode(str(sorted((tiny_data / "train").glob("*/*.jpg"))[5])), np.array([0, 0, 64, 64]),
                  False, [], 48, "bicubic")
    hparams = {"translate_const": 100, "img_mean": FILL, "interpolation": Image.Resampling.BICUBIC}
    names = RA_OPS_INC if increasing else RA_OPS
    for k, name in enumerate(names):
        for mag in (3.0, 9.0):
            theirs = np.asarray(AugmentOp(name, prob=1.0, magnitude=mag, hparams=hparams)(img))
            ours = [np.asarray(augment(img, np.array([0, 0, 48, 48]), False,
                                       [(name, float(level_to_arg(k, np.array([mag]), np.array([neg]),
                                                                  increasing)[0]))], 48, "bicubic"))
                    for neg in (False, True)]
            assert any(np.array_equal(o, theirs) for o in ours), name
            assert not np.array_equal(ours[0], np.asarray(img)) or name in ("AutoContrast", "Equalize"), name


def test_corrupt_file_is_skipped_and_reported(tiny_data, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    victim = sorted((root / "train").glob("*/*.jpg"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # truncated: header fine, pixels missing
    garbage = sorted((root / "train").glob("*/*.jpg"))[9]
    garbage.write_bytes(b"not a jpeg at all")
    index = scan_split(root, "train")
    assert index.unreadable == [str(garbage.relative_to(root / "train"))]
    s = PlanSpec(seed=0, img_size=32, batch_size=index.labels.size // 8 * 8, aug=AugConfig(mix_group=8))
    plan = make_plan(s, index.sizes, 0, 0)
    out = load_plan_rows(index, s, plan)
    names = {str(victim.relative_to(root / "train")), str(garbage.relative_to(root / "train"))}
    assert set(out.bad) == names & {index.paths[i] for i in plan.index}
    for name in out.bad:
        row = [index.paths[i] for i in plan.index].index(name)
        other = row - 1 if row > 0 else row + 1
        assert torch.equal(out.images[row], out.images[other]) and out.labels[row] == out.labels[other]


def test_loader_workers_give_the_same_batches(tiny_data):
    index = scan_split(tiny_data, "train")
    s = PlanSpec(seed=0, img_size=32, batch_size=16, aug=AugConfig(mix_group=8))
    a = list(train_loader(index, s, 1, 1, workers=0))
    b = list(train_loader(index, s, 1, 1, workers=2))
    assert len(a) == len(b) == 72 // 16 - 1
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and x.plan.step == y.plan.step


def test_eval_transform_is_resize_then_centre_crop(marker_data):
    root, _ = marker_data
    index = scan_split(root, "val")
    images, labels, ok = next(iter(eval_loader(index, 64, 0.875, 8, workers=0)))
    ref = T.Compose([T.Resize(int(64 / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64),
                     T.PILToTensor()])
    expected = torch.stack([ref(decode(str(index.root / p))) for p in index.paths])
    assert torch.equal(images, expected) and ok.all() and labels.tolist() == [0, 1]
