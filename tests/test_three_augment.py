"""DeiT III's 3-Augment (official augment.py): the plan's draws, each op against the library
call the official transform makes, and a run with it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.config.schema import AugConfig
from fastdeit.data.plan import JITTER, THREE_OPS, PlanSpec, make_plan
from fastdeit.pipelines.reference import three_augment

from tiny import TINY_MODEL, TINY_RUN

SIZES = np.random.default_rng(0).integers(40, 90, size=(256, 2))


def spec(**aug) -> PlanSpec:
    return PlanSpec(seed=1, img_size=32, batch_size=128, aug=replace(AugConfig(), mix_group=8, **aug))


def picture(seed: int = 0) -> Image.Image:
    """A smooth picture with edges (blur and contrast have something to act on)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:48]
    rgb = np.stack([x * 5, y * 5, (x + y) * 2], -1) + rng.integers(0, 40, (48, 48, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def test_the_plan_draws_3_augment_last_and_only_where_it_is_on():
    off = make_plan(spec(), SIZES, 2, 1)
    on = make_plan(spec(three_augment=True, rand_augment=""), SIZES, 2, 1)
    plain = make_plan(spec(rand_augment=""), SIZES, 2, 1)
    for name in ("crop", "flip", "erase", "lam", "partner", "index"):  # drawn before: unchanged
        assert np.array_equal(getattr(on, name), getattr(plain, name)), name
    assert (off.three_op == -1).all() and (off.jitter == 1).all()
    assert set(on.three_op.tolist()) == {0, 1, 2} and len(THREE_OPS) == 3 and len(JITTER) == 3
    assert ((on.blur >= 0.1) & (on.blur <= 2.0)).all()
    assert ((on.jitter >= 0.7) & (on.jitter <= 1.3)).all() and on.jitter.std() > 0.1
    assert all(sorted(row) == [0, 1, 2] for row in on.jitter_order.tolist())
    assert len({tuple(row) for row in on.jitter_order.tolist()}) == 6  # every order occurs
    shard = on.shard(1, 4)
    assert np.array_equal(shard.jitter, on.jitter[32:64]) and np.array_equal(shard.three_op, on.three_op[32:64])


def test_a_plan_without_3_augment_records_what_it_recorded_before():
    """Caches and checkpoints keep their plan's JSON: the new keys appear only where 3-Augment is on."""
    old = spec().to_json()
    assert "three_augment" not in old["aug"] and "color_jitter" not in old["aug"]
    assert spec(three_augment=True, rand_augment="").to_json()["aug"]["color_jitter"] == 0.3


@pytest.mark.parametrize("op", [0, 1, 2])
def test_each_op_is_the_official_transforms(op):
    """grayscale: torchvision's Grayscale(3); solarize: ImageOps.solarize (threshold 128);
    blur: PIL's GaussianBlur of the plan's radius (the official classes at p=1)."""
    img, radius, unit = picture(op), 1.3, np.ones(3, np.float32)
    ours = three_augment(img, op, radius, unit, np.arange(3))
    want = [transforms.Grayscale(3)(img), ImageOps.solarize(img), img.filter(ImageFilter.GaussianBlur(radius))][op]
    assert np.array_equal(np.asarray(ours), np.asarray(want))


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_the_jitter_is_torchvisions_color_jitter_with_the_plans_factors_and_order(order, monkeypatch):
    """ColorJitter(0.3, 0.3, 0.3) with its random draws replaced by the plan's (torchvision
    permutes brightness, contrast, saturation and hue; hue is off)."""
    img = picture(7)
    factors = np.array([1.2, 0.75, 1.28], np.float32)
    jitter = transforms.ColorJitter(0.3, 0.3, 0.3)
    drawn = (torch.tensor([*order, 3]), float(factors[0]), float(factors[1]), float(factors[2]), None)
    monkeypatch.setattr(transforms.ColorJitter, "get_params", staticmethod(lambda *a: drawn))
    want = jitter(ImageOps.solarize(img))
    ours = three_augment(img, 1, 0.5, factors, np.array(order))
    assert np.array_equal(np.asarray(ours), np.asarray(want))


def test_a_run_with_3_augment_trains_and_randaugment_beside_it_is_one_line(tiny_data, tmp_path):
    runner = CliRunner()
    base = ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny",
            "--set", "aug.three_augment=true"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "run"), "--set", "aug.rand_augment="])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["aug"]["three_augment"] is True
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "no"), "--set", "aug.rand_augment=rand-m9-mstd0.5-inc1"])
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and "aug.three_augment" in line and "aug.rand_augment=" in line, res.output
    assert not (tmp_path / "no").exists()


def test_the_reference_pipeline_executes_the_plans_3_augment(tiny_data):
    """Rows of a 3-Augment plan (jitter off) are the plain plan's rows after their op: gray
    rows have equal channels, solarized rows are ImageOps.solarize of the plain row."""
    from fastdeit.data.folder import scan_split
    from fastdeit.pipelines.reference import load_plan_rows

    index = scan_split(tiny_data, "train")
    s = PlanSpec(seed=1, img_size=32, batch_size=24, aug=replace(AugConfig(), mix_group=8, rand_augment=""))
    on = replace(s, aug=replace(s.aug, three_augment=True, color_jitter=0.0))
    plain, three = (load_plan_rows(index, x, make_plan(x, index.sizes, 0, 0)) for x in (s, on))
    ops = three.plan.three_op
    assert set(ops.tolist()) == {0, 1, 2}
    for i, op in enumerate(ops.tolist()):
        got, base = three.images[i], plain.images[i]
        if THREE_OPS[op] == "grayscale":
            assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2]) and not torch.equal(got, base)
        elif THREE_OPS[op] == "solarize":
            want = ImageOps.solarize(Image.fromarray(base.permute(1, 2, 0).numpy()))
            assert np.array_equal(got.permute(1, 2, 0).numpy(), np.asarray(want))


DALI = pytest.mark.skipif(not __import__("fastdeit.pipelines.dali", fromlist=["x"]).available(), reason="no DALI")


def dali_and_reference(index, s, device=torch.device("cpu")):
    from fastdeit.pipelines import dali
    from fastdeit.pipelines.reference import load_plan_rows

    batches = list(dali.DaliTrainLoader(index, s, device, threads=2).epoch(0))
    return [(b, load_plan_rows(index, s, b.plan)) for b in batches]


@DALI
@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_the_dali_graph_runs_the_plans_3_augment_as_the_reference_does(tiny_data, jitter):
    """Per sample, the DALI CPU graph (the GPU graph's twin) and the reference agree to under
    1.5 levels of 255 on average (measured: 0.2 for grayscale and solarize, about the crop and
    resize's own difference; 0.8 for the blur, a true Gaussian against PIL's three box passes)."""
    from fastdeit.data.folder import scan_split

    index = scan_split(tiny_data, "train")
    s = PlanSpec(seed=3, img_size=48, batch_size=24, aug=replace(AugConfig(), mix_group=8, repeated_aug=1,
                                                                rand_augment="", three_augment=True,
                                                                color_jitter=jitter))
    seen = set()
    for ours, ref in dali_and_reference(index, s):
        mad = (ours.images.float() - ref.images.float()).abs().mean(dim=(1, 2, 3))
        assert torch.equal(ours.labels, ref.labels) and mad.max() < 1.5, mad
        seen |= set(ours.plan.three_op.tolist())
    assert seen == {0, 1, 2}


@DALI
@pytest.mark.gpu
def test_the_gpu_graph_runs_3_augment_as_the_cpu_graph(tiny_data):
    from fastdeit.data.folder import scan_split
    from fastdeit.pipelines import dali

    index = scan_split(tiny_data, "train")
    s = PlanSpec(seed=3, img_size=48, batch_size=24, aug=replace(AugConfig(), mix_group=8, repeated_aug=1,
                                                                rand_augment="", three_augment=True))
    cpu = list(dali.DaliTrainLoader(index, s, torch.device("cpu"), threads=2).epoch(0))
    gpu = list(dali.DaliTrainLoader(index, s, torch.device("cuda"), threads=2).epoch(0))
    for c, g in zip(cpu, gpu, strict=True):
        assert g.images.is_cuda and (g.images.cpu().float() - c.images.float()).abs().mean() < 3.0


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=DALI)])
def test_the_deit3_recipes_train_end_to_end(tiny_data, teacher, tmp_path, loader):
    """--recipe deit3 (3-Augment, BCE, LAMB, unscaled lr, crop 1.0) with each pipeline, and
    --recipe deit3-finetune from its weights; DeiT III's recipe with a distilled student and a
    live teacher too (the student then needs a distillation token)."""
    runner = CliRunner()
    small = [*TINY_MODEL, "--data", str(tiny_data), "--img-size", "32", "--batch-size", "16", "--epochs", "1",
             "--loader", loader, "--set", "data.workers=0", "--set", "run.progress=false",
             "--set", "aug.mix_group=8", "--set", "data.eval_batch_size=32", "--set", "sched.warmup_epochs=0"]
    pre = tmp_path / "pre"
    res = runner.invoke(app, ["train", "--recipe", "deit3", *small, "--out", str(pre)])
    assert res.exit_code == 0, res.output
    config = json.loads((pre / "config.json").read_text())
    assert config["aug"]["three_augment"] and config["distill"]["base_loss"] == "bce"
    res = runner.invoke(app, ["train", "--recipe", "deit3-finetune", *small, "--model", "deit3_small",
                              "--out", str(tmp_path / "ft"), "--set", f"model.init={pre}"])
    assert res.exit_code == 0, res.output
    hard = ["train", "--recipe", "deit3", *small, "--model", "deit_tiny_distilled", "--distill", "hard",
            "--teacher", "resnet10t", "--teacher-ckpt", str(teacher)]
    res = runner.invoke(app, [*hard, "--out", str(tmp_path / "hard")])
    assert res.exit_code == 0, res.output
    # ... and with the teacher's targets replayed from a cache of the recipe's plan: the live run's losses.
    plan = ["--data", str(tiny_data), "--img-size", "32", "--batch-size", "16", "--loader", loader,
            "--set", "data.workers=0", "--set", "aug.mix_group=8",  # what the plan depends on, as the runs have it
            "--set", "sched.warmup_epochs=0"]  # (--epochs 1 here: the recipe's 5 warm-up epochs would not fit)
    res = runner.invoke(app, ["cache-teacher", "--recipe", "deit3", *plan, "--teacher", "resnet10t", "--teacher-ckpt",
                              str(teacher), "--out", str(tmp_path / "cache"), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*hard, "--targets", "replay", "--teacher-cache", str(tmp_path / "cache"),
                              "--out", str(tmp_path / "replay")])
    assert res.exit_code == 0, res.output
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "step"] for run in ("hard", "replay")]
    assert losses[0] and losses[0] == losses[1]
