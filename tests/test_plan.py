import hashlib
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from timm.data import auto_augment as aa

from fastdeit.config.recipes import recipe
from fastdeit.config.schema import AugConfig
from fastdeit.data.plan import RA_OPS, RA_OPS_INC, PlanSpec, epoch_order, level_to_arg, make_plan, steps_per_epoch
from fastdeit.errors import UserError

RNG = np.random.default_rng(123)
SIZES = np.stack([RNG.integers(40, 400, 2100), RNG.integers(40, 400, 2100)], 1).astype(np.int32)


def spec(**aug) -> PlanSpec:
    return PlanSpec(seed=3, img_size=64, batch_size=64, aug=replace(AugConfig(mix_group=16), **aug))


def digest(plan) -> str:
    h = hashlib.sha256()
    for name in ("pos", "index", "crop", "flip", "ra_op", "ra_arg", "erase", "lam", "cutmix", "box", "partner"):
        h.update(np.ascontiguousarray(getattr(plan, name)).tobytes())
    return h.hexdigest()


def test_same_inputs_same_plan_and_steps_differ():
    s = spec()
    assert digest(make_plan(s, SIZES, 2, 5)) == digest(make_plan(s, SIZES, 2, 5))
    assert digest(make_plan(s, SIZES, 2, 5)) != digest(make_plan(s, SIZES, 2, 6))
    assert digest(make_plan(s, SIZES, 2, 5)) != digest(make_plan(s, SIZES, 3, 5))
    assert digest(make_plan(s, SIZES, 2, 5)) != digest(make_plan(replace(s, seed=4), SIZES, 2, 5))


def test_same_plan_in_another_process():
    code = ("import numpy as np, sys; sys.path.insert(0, 'tests');"
            "from test_plan import SIZES, spec, digest; from fastdeit.data.plan import make_plan;"
            "print(digest(make_plan(spec(), SIZES, 1, 2)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(make_plan(spec(), SIZES, 1, 2))


def test_world_size_does_not_change_what_is_seen():
    plan = make_plan(spec(), SIZES, 0, 1)
    for world in (1, 2, 4):
        shards = [plan.shard(r, world) for r in range(world)]
        assert np.array_equal(np.concatenate([p.index for p in shards]), plan.index)
        assert np.array_equal(np.concatenate([p.crop for p in shards]), plan.crop)
        assert np.array_equal(np.concatenate([p.partner + r * len(p) for r, p in enumerate(shards)]), plan.partner)
    with pytest.raises(ValueError, match="whole mix groups"):
        plan.rows(0, 24)


def test_repeated_augmentation_and_epoch_coverage():
    s = spec(repeated_aug=3)
    steps = steps_per_epoch(s, len(SIZES))
    seen = np.concatenate([make_plan(s, SIZES, 0, k).index for k in range(steps)])
    assert len(seen) == steps * 64 <= len(SIZES)
    _, counts = np.unique(seen, return_counts=True)
    assert counts.max() == 3 and (counts == 3).mean() > 0.9
    plan = make_plan(s, SIZES, 0, 0)
    # the three copies of an image sit in different mix groups, each with its own view
    for idx in np.unique(plan.index):
        rows = np.flatnonzero(plan.index == idx)
        assert len(set(rows // 16)) == len(rows)
    plain = np.concatenate([make_plan(spec(repeated_aug=1), SIZES, 0, k).index for k in range(steps)])
    assert len(np.unique(plain)) == len(plain)
    assert not np.array_equal(epoch_order(3, 0, 2100, 1), epoch_order(3, 1, 2100, 1))


def test_crops_follow_random_resized_crop():
    s = spec(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    crops = np.concatenate([make_plan(s, SIZES, 0, k).crop for k in range(7)])
    idx = np.concatenate([make_plan(s, SIZES, 0, k).index for k in range(7)])
    w, h = SIZES[idx, 0], SIZES[idx, 1]
    left, top, cw, ch = crops.T
    assert (left >= 0).all() and (top >= 0).all() and (left + cw <= w).all() and (top + ch <= h).all()
    frac = cw * ch / (w * h)
    assert frac.min() > 0.06 and frac.max() <= 1.0
    ratio = cw / ch
    # rounding to whole pixels widens the ratio bounds a little on small crops
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    assert frac.std() > 0.15  # spread over the scale range, not constant


def test_crop_fallback_for_extreme_aspect():
    sizes = np.array([[400, 20]] * 64, np.int32)
    crop = make_plan(spec(scale=(0.9, 1.0)), sizes, 0, 0).crop
    assert (crop[:, 3] == 20).all() and (crop[:, 2] == round(20 * 4 / 3)).all()


@pytest.mark.parametrize("increasing", [True, False])
def test_rand_augment_args_match_timm(increasing):
    names = RA_OPS_INC if increasing else RA_OPS
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        fn = aa.LEVEL_TO_ARG[name]
        for mag in rng.uniform(0, 10, 20):
            ours_pos = level_to_arg(k, np.array([mag]), np.array([False]), increasing)[0]
            ours_neg = level_to_arg(k, np.array([mag]), np.array([True]), increasing)[0]
            if fn is None:
                assert ours_pos == ours_neg == 0
                continue
            theirs = {fn(mag, {"translate_pct": 0.45})[0] for _ in range(64)}  # timm negates at random
            assert any(math.isclose(ours_pos, t, abs_tol=1e-9) for t in theirs)
            assert any(math.isclose(ours_neg, t, abs_tol=1e-9) for t in theirs)


def test_rand_augment_draws():
    plan = make_plan(PlanSpec(seed=0, img_size=64, batch_size=1024, aug=AugConfig()), SIZES, 0, 0)
    assert plan.ra_op.shape == (1024, 2)
    applied = plan.ra_op >= 0
    assert 0.4 < applied.mean() < 0.6  # p = 0.5 per layer
    assert set(np.unique(plan.ra_op[applied])) == set(range(15))
    rot = plan.ra_arg[plan.ra_op == RA_OPS_INC.index("Rotate")]
    assert (np.abs(rot) <= 30).all() and (rot < 0).any() and (rot > 0).any()
    assert 20 < np.abs(rot).mean() < 30  # m9 +- 0.5 -> about 27 degrees


def test_erasing_boxes():
    plan = make_plan(PlanSpec(seed=0, img_size=64, batch_size=1024, aug=AugConfig()), SIZES, 0, 0)
    on = plan.erase[:, 2] > 0
    assert 0.2 < on.mean() < 0.3
    top, left, h, w = plan.erase[on].T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    area = h * w / 64 ** 2
    assert area.min() >= 0.015 and area.max() <= 0.35


def test_mixing_groups():
    plan = make_plan(PlanSpec(seed=1, img_size=64, batch_size=1024, aug=AugConfig(mix_group=64)), SIZES, 0, 0)
    g = np.arange(1024) // 64
    assert (g[plan.partner] == g).all() and (plan.partner[plan.partner] == np.arange(1024)).all()
    for k in range(16):
        rows = g == k
        assert len(set(plan.lam[rows])) == 1 and len(set(plan.cutmix[rows])) == 1
    cut = plan.cutmix[::64]
    assert 0 < cut.sum() < 16
    y0, y1, x0, x1 = plan.box[::64][cut].T
    assert np.allclose(plan.lam[::64][cut], 1 - (y1 - y0) * (x1 - x0) / 64 ** 2)
    off = make_plan(PlanSpec(0, 64, 64, AugConfig(mixup=0, cutmix=0, mix_group=16)), SIZES, 0, 0)
    assert (off.lam == 1).all() and (off.partner == np.arange(64)).all()


def test_config_spec_and_too_small_dataset():
    s = PlanSpec.from_config(recipe("deit"))
    assert s.batch_size == 1024 and s.img_size == 224 and s.to_json()["aug"]["repeated_aug"] == 3
    with pytest.raises(UserError, match="fewer than one global batch"):
        steps_per_epoch(s, 1000)
