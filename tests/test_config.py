import json

import pytest

from fastdeit.config.checks import validate
from fastdeit.config.randaugment import parse_rand_augment
from fastdeit.config.recipes import RECIPES, recipe
from fastdeit.config.schema import (
    TrainConfig,
    apply_overrides,
    per_rank_batch,
    save_json,
    scaled_lr,
    with_section,
)
from fastdeit.errors import UserError


def test_deit_recipe_is_the_papers():
    c = recipe("deit")
    assert (c.optim.opt, c.optim.lr, c.optim.base_batch) == ("adamw", 5e-4, 512)
    assert (c.optim.betas, c.optim.eps, c.optim.weight_decay) == ((0.9, 0.999), 1e-8, 0.05)
    assert (c.sched.epochs, c.sched.warmup_epochs, c.sched.warmup_lr, c.sched.min_lr) == (300, 5, 1e-6, 1e-5)
    assert c.model.drop_path == 0.1 and c.model.ema_decay == 0.99996 and not c.model.ema
    a = c.aug
    assert a.rand_augment == "rand-m9-mstd0.5-inc1" and a.interpolation == "bicubic"
    assert a.scale == (0.08, 1.0) and a.ratio == (3 / 4, 4 / 3) and a.hflip == 0.5
    assert (a.reprob, a.mixup, a.cutmix, a.switch_prob, a.smoothing, a.repeated_aug) == (0.25, 0.8, 1.0, 0.5, 0.1, 3)
    assert c.data.img_size == 224 and c.data.crop_pct == 0.875 and c.run.batch_size == 1024
    assert (c.distill.alpha, c.distill.tau) == (0.5, 1.0)
    assert scaled_lr(c) == pytest.approx(1e-3)


def test_overrides_are_typed():
    c = apply_overrides(recipe("deit"), ["optim.lr=0.001", "aug.scale=0.2,0.9", "model.ema=true",
                                         "run.batch_size=256", "model.name=deit_base"])
    assert c.optim.lr == 0.001 and c.aug.scale == (0.2, 0.9) and c.model.ema is True
    assert c.run.batch_size == 256 and c.model.name == "deit_base"


@pytest.mark.parametrize("item, words", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nope.lr=1", "unknown config section 'nope'"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("run.batch_size=1.5", "run.batch_size must be an integer"),
    ("model.ema=maybe", "model.ema must be true or false"),
    ("aug.scale=0.5", "aug.scale must be a comma-separated pair"),
    ("lr=1", "--set takes section.key=value"),
])
def test_bad_overrides_name_the_problem(item, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(".", r"\.")):
        apply_overrides(recipe("deit"), [item])


def test_json_round_trip_and_unknown_keys():
    c = apply_overrides(recipe("demo"), ["aug.scale=0.3,1.0", "distill.mode=hard", "distill.teacher=x"])
    again = TrainConfig.from_dict(json.loads(save_json(c)))
    assert again == c
    d = c.to_dict()
    d["optim"]["momentum"] = 0.9
    with pytest.raises(UserError, match="unknown config key optim.momentum"):
        TrainConfig.from_dict(d)


@pytest.mark.parametrize("changes, words", [
    (dict(run={"batch_size": 1000}), "not a multiple of aug.mix_group"),
    (dict(aug={"mix_group": 7}, run={"batch_size": 21}), "must be even when mixup"),
    (dict(distill={"mode": "hard"}), "distill.mode hard needs a teacher"),
    (dict(distill={"mode": "warm"}), "distill.mode must be one of none, soft, hard, got 'warm'"),
    (dict(run={"device": "tpu"}), "run.device must be one of auto, cpu, cuda"),
    (dict(model={"attn": "fast"}), "model.attn must be one of auto, sdpa, flex, triton, math"),
    (dict(aug={"rand_augment": "rand-q4"}), "cannot read 'q4'"),
    (dict(aug={"scale": (0.9, 0.1)}), "aug.scale must satisfy"),
    (dict(sched={"warmup_epochs": 400.0}), "warmup_epochs"),
])
def test_validation_errors(changes, words):
    c = recipe("deit")
    for section, values in changes.items():
        c = with_section(c, section, **values)
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        validate(c)


def test_recipes_validate_and_unknown_recipe():
    for name in RECIPES:
        validate(recipe(name))
    with pytest.raises(UserError, match="unknown recipe 'imagenet'"):
        recipe("imagenet")


def test_per_rank_batch_needs_whole_groups():
    c = recipe("deit")  # 1024, groups of 64
    assert per_rank_batch(c, 8) == 128
    with pytest.raises(UserError, match="multiple of 192"):
        per_rank_batch(c, 3)


def test_rand_augment_grammar():
    ra = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.magnitude_std, ra.increasing, ra.num_layers, ra.prob) == (9, 0.5, True, 2, 0.5)
    assert parse_rand_augment("rand-m7-n3-p0.9-mstd101").magnitude_std == float("inf")
    with pytest.raises(UserError):
        parse_rand_augment("auto-m9")


def test_an_unscaled_lr_is_used_as_given_at_any_batch():
    """optim.scale_lr=false (DeiT III's official --unscale-lr): no batch / base_batch factor."""
    for batch in (256, 2048):
        c = apply_overrides(recipe("deit"), [f"run.batch_size={batch}", "optim.lr=0.004"])
        assert scaled_lr(c) == pytest.approx(0.004 * batch / 512)
        assert scaled_lr(apply_overrides(c, ["optim.scale_lr=false"])) == 0.004


# facebookresearch/deit, README_revenge.md at commit 7e160fe: the ViT-S pre-training command
# (its "--repeated-aug--bce-loss" lacks a space, which argparse would refuse; the ViT-B line of
# the same page has it) and the ViT-B fine-tuning at 224 px. Data path, seed and class count
# are left out.
OFFICIAL_DEIT3 = (
    "--model deit_small_patch16_LS --batch 256 --lr 4e-3 --epochs 800 --weight-decay 0.05 --sched cosine "
    "--input-size 224 --eval-crop-ratio 1.0 --reprob 0.0 --nodes 1 --ngpus 8 --smoothing 0.0 --warmup-epochs 5 "
    "--drop 0.0 --opt fusedlamb --warmup-lr 1e-6 --mixup .8 --drop-path 0.05 --cutmix 1.0 --unscale-lr "
    "--repeated-aug --bce-loss --color-jitter 0.3 --ThreeAugment")
OFFICIAL_DEIT3_FINETUNE = (
    "--model deit_base_patch16_LS --batch 64 --lr 1e-5 --epochs 20 --weight-decay 0.1 --sched cosine "
    "--input-size 224 --eval-crop-ratio 1.0 --reprob 0.0 --nodes 1 --ngpus 8 --smoothing 0.1 --warmup-epochs 5 "
    "--drop 0.0 --opt adamw --warmup-lr 1e-6 --mixup .8 --drop-path 0.2 --cutmix 1.0 --unscale-lr "
    "--aa rand-m9-mstd0.5-inc1 --no-repeated-aug")


def _official(command: str) -> dict[str, str | bool]:
    words, out = command.split(), {}
    for k, word in enumerate(words):
        if word.startswith("--"):
            follows = words[k + 1] if k + 1 < len(words) else "--"
            out[word[2:]] = True if follows.startswith("--") else follows
    return out


@pytest.mark.parametrize(("name", "command"), [("deit3", OFFICIAL_DEIT3), ("deit3-finetune", OFFICIAL_DEIT3_FINETUNE)])
def test_the_deit3_recipes_are_the_official_commands(name, command):
    """Field for field; main.py's defaults where the command gives none (min lr 1e-5, RASampler's
    3 repeats, no RandAugment where 3-Augment replaces the transform). fusedlamb is apex's
    LAMB, timm's `lamb` its built-in twin (apex is not on PyPI)."""
    o, c = _official(command), recipe(name)
    three = "ThreeAugment" in o
    assert c.model.name == {"deit_small_patch16_LS": "deit3_small", "deit_base_patch16_LS": "deit3_base"}[o["model"]]
    assert c.run.batch_size == int(o["batch"]) * int(o["ngpus"]) * int(o["nodes"])
    assert (c.optim.lr, c.optim.scale_lr, c.optim.weight_decay) == (float(o["lr"]), not o.get("unscale-lr"),
                                                                    float(o["weight-decay"]))
    assert c.optim.opt == {"fusedlamb": "lamb", "adamw": "adamw"}[o["opt"]]
    assert (c.sched.epochs, c.sched.warmup_epochs, c.sched.warmup_lr, c.sched.min_lr) == (
        int(o["epochs"]), float(o["warmup-epochs"]), float(o["warmup-lr"]), 1e-5)
    assert (c.data.img_size, c.data.crop_pct) == (int(o["input-size"]), float(o["eval-crop-ratio"]))
    a = c.aug
    assert (a.reprob, a.smoothing, a.mixup, a.cutmix) == (float(o["reprob"]), float(o["smoothing"]),
                                                          float(o["mixup"]), float(o["cutmix"]))
    assert a.three_augment == three and (not three or a.color_jitter == float(o["color-jitter"]))
    assert a.rand_augment == ("" if three else o["aa"])
    assert a.repeated_aug == (3 if o.get("repeated-aug") else 1)
    assert c.model.drop_path == float(o["drop-path"]) and c.distill.mode == "none"
    assert c.distill.base_loss == ("bce" if o.get("bce-loss") else "ce")
    validate(c)
