"""DeiT III's simple random crop (the official --src: Resize, RandomCrop with 4 px of reflect
padding, flip): the plan's draws, the reference against torchvision's transforms, the DALI
graph against the reference, and a run with it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.config.schema import AugConfig
from fastdeit.data.plan import SRC_PAD, PlanSpec, make_plan, src_resized
from fastdeit.pipelines.reference import simple_crop

from tiny import TINY_MODEL, TINY_RUN

SIZES = np.array([[90, 60], [60, 90], [64, 64], [200, 41], [41, 200], [33, 32]] * 20)
DALI = pytest.mark.skipif(not __import__("fastdeit.pipelines.dali", fromlist=["x"]).available(), reason="no DALI")


def spec(**aug) -> PlanSpec:
    return PlanSpec(seed=1, img_size=32, batch_size=96, aug=replace(AugConfig(), mix_group=8, **aug))


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients and noise: every row and column differs, so a wrong reflection or offset shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 3, y * 3, (x * y) % 256], -1) + rng.integers(0, 30, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def test_resize_is_torchvisions_shorter_side_rule():
    for w, h in SIZES[:6].tolist():
        want = transforms.Resize(32)(picture(w, h)).size  # (width, height)
        assert tuple(src_resized(np.array([[w, h]]), 32)[0][::-1]) == want


def test_the_plan_draws_the_window_last_over_the_whole_padded_image():
    plain = make_plan(spec(), SIZES, 1, 0)
    src = make_plan(spec(simple_crop=True), SIZES, 1, 0)
    for name in ("flip", "ra_op", "erase", "lam", "partner", "index"):  # drawn before: unchanged
        assert np.array_equal(getattr(src, name), getattr(plain, name)), name
    assert (plain.src == -1).all()
    sizes = SIZES[src.index]
    assert np.array_equal(src.crop, np.concatenate([np.zeros_like(sizes), sizes], 1))  # the whole image
    room = src_resized(sizes, 32) + 2 * SRC_PAD - 32  # the last window's start
    assert ((src.src >= 0) & (src.src <= room)).all()
    many = np.concatenate([make_plan(spec(simple_crop=True), SIZES, e, 0).src for e in range(1, 12)])
    assert set(many[:, 0].tolist()) >= {0, 2 * SRC_PAD}  # both ends of the short side are reached
    assert "simple_crop" not in spec().to_json()["aug"]  # caches and checkpoints of before stay valid
    assert spec(simple_crop=True).to_json()["aug"]["simple_crop"] is True


@pytest.mark.parametrize("window", [(0, 0), (8, 3), (5, 8), (2, 30)])
@pytest.mark.parametrize("size", [(90, 60), (41, 70)])
def test_the_reference_is_the_official_transforms(window, size, monkeypatch):
    """Resize(s, bicubic) then RandomCrop(s, padding=4, padding_mode='reflect') with its draw
    replaced by the plan's window: the same pixels, bit for bit."""
    img = picture(*size, seed=window[0])
    top, left = window
    room = src_resized(np.array([size]), 32)[0] + 2 * SRC_PAD - 32
    top, left = min(top, room[0]), min(left, room[1])
    monkeypatch.setattr(transforms.RandomCrop, "get_params", staticmethod(lambda *a: (top, left, 32, 32)))
    official = transforms.Compose([transforms.Resize(32, interpolation=3),
                                   transforms.RandomCrop(32, padding=4, padding_mode="reflect")])
    ours = simple_crop(img, np.array([top, left]), 32, "bicubic")
    assert np.array_equal(np.asarray(ours), np.asarray(official(img)))


def test_labelmap_targets_are_refused_with_it_in_one_line(tiny_data, tmp_path):
    res = CliRunner().invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--out",
                                   str(tmp_path / "run"), "--set", "aug.simple_crop=true", "--model",
                                   "deit_tiny_distilled", "--distill", "hard", "--teacher", "resnet10t",
                                   "--set", "distill.targets=labelmap", "--set", f"distill.teacher_cache={tmp_path}"])
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and "aug.simple_crop" in line and "label map" in line, res.output


def train_spec(**aug) -> PlanSpec:
    return PlanSpec(seed=5, img_size=40, batch_size=24, aug=replace(AugConfig(), mix_group=8, repeated_aug=1,
                                                                   rand_augment="", reprob=0.0, simple_crop=True,
                                                                   **aug))


@DALI
def test_the_dali_graph_crops_as_the_reference_does(tiny_data):
    """Per sample, the DALI CPU graph (the GPU graph's twin) and the reference agree to under
    0.5 levels of 255 on average (measured 0.19: the resize's own difference; a wrong border
    reflection or window costs several levels)."""
    from fastdeit.data.folder import scan_split
    from fastdeit.pipelines import dali
    from fastdeit.pipelines.reference import load_plan_rows

    index = scan_split(tiny_data, "train")
    s = train_spec()
    edges = set()
    for ours in dali.DaliTrainLoader(index, s, torch.device("cpu"), threads=2).epoch(0):
        ref = load_plan_rows(index, s, ours.plan)
        mad = (ours.images.float() - ref.images.float()).abs().mean(dim=(1, 2, 3))
        assert torch.equal(ours.labels, ref.labels) and mad.max() < 0.5, mad
        room = src_resized(index.sizes[ours.plan.index], 40) + 2 * SRC_PAD - 40
        edges |= {"top" for t in ours.plan.src[:, 0] if t < SRC_PAD} | {"bottom" for t, r in
                                                                        zip(ours.plan.src[:, 0], room[:, 0])
                                                                        if t > r - SRC_PAD}
        edges |= {"flip"} if ours.plan.flip.any() else set()
    assert edges == {"top", "bottom", "flip"}  # windows reached into both borders of the short side


@DALI
@pytest.mark.gpu
def test_the_gpu_graph_crops_as_the_cpu_graph(tiny_data):
    from fastdeit.data.folder import scan_split
    from fastdeit.pipelines import dali

    index = scan_split(tiny_data, "train")
    s = train_spec(three_augment=True)
    cpu = list(dali.DaliTrainLoader(index, s, torch.device("cpu"), threads=2).epoch(0))
    gpu = list(dali.DaliTrainLoader(index, s, torch.device("cuda"), threads=2).epoch(0))
    for c, g in zip(cpu, gpu, strict=True):
        assert g.images.is_cuda and (g.images.cpu().float() - c.images.float()).abs().mean() < 3.0


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=DALI)])
def test_a_deit3_run_with_the_simple_random_crop_trains(tiny_data, tmp_path, loader):
    res = CliRunner().invoke(app, ["train", "--recipe", "deit3", *TINY_MODEL, "--data", str(tiny_data),
                                   "--img-size", "32", "--batch-size", "16", "--epochs", "1", "--loader", loader,
                                   "--set", "data.workers=0", "--set", "run.progress=false",
                                   "--set", "aug.mix_group=8", "--set", "sched.warmup_epochs=0",
                                   "--set", "aug.simple_crop=true", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
