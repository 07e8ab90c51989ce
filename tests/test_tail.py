from dataclasses import replace

import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target
from torchvision.transforms import functional as TF

from fastdeit.config.schema import IMAGENET_MEAN, IMAGENET_STD, AugConfig
from fastdeit.data.plan import PlanSpec, make_plan
from fastdeit.pipelines.tail import apply_tail, erase_box_noise, erase_noise, normalize

SIZES = np.full((64, 2), 100, np.int32)


def batch(b=16, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8), torch.randint(0, 10, (b,), generator=g)


def plan_for(b=16, s=24, **aug):
    aug = dict(dict(mix_group=b, reprob=0.0, mixup=0.0, cutmix=0.0), **aug)
    return make_plan(PlanSpec(seed=5, img_size=s, batch_size=b, aug=replace(AugConfig(), **aug)), SIZES, 0, 0)


def test_normalize_matches_torchvision():
    x, _ = batch()
    ref = TF.normalize(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(normalize(x), ref, atol=1e-5)


def test_no_mixing_gives_smoothed_one_hot():
    x, y = batch()
    out = apply_tail(x, y, plan_for(), 10, 0.1)
    assert torch.allclose(out.images, normalize(x))
    assert torch.allclose(out.soft_labels, mixup_target(y, 10, 1.0, 0.1))


def test_mixup_is_timms_batch_mixup():
    x, y = batch()
    plan = plan_for(mixup=0.8)
    lam = float(plan.lam[0])
    assert 0 < lam < 1 and not plan.cutmix.any()
    out = apply_tail(x, y, plan, 10, 0.1)
    xn = normalize(x)
    assert torch.allclose(out.images, xn * lam + xn.flip(0) * (1 - lam), atol=1e-6)
    assert torch.allclose(out.soft_labels, mixup_target(y, 10, lam, 0.1), atol=1e-6)


def test_cutmix_pastes_the_partners_box():
    x, y = batch()
    plan = plan_for(cutmix=1.0)
    y0, y1, x0, x1 = (int(v) for v in plan.box[0])
    assert plan.cutmix.all() and (y1 - y0) * (x1 - x0) > 0
    out = apply_tail(x, y, plan, 10, 0.0)
    xn = normalize(x)
    ref = xn.clone()
    ref[:, :, y0:y1, x0:x1] = xn.flip(0)[:, :, y0:y1, x0:x1]
    assert torch.equal(out.images, ref)
    lam = 1 - (y1 - y0) * (x1 - x0) / 24 ** 2
    assert plan.lam[0] == pytest.approx(lam)
    assert torch.allclose(out.soft_labels, mixup_target(y, 10, lam, 0.0), atol=1e-6)
    assert torch.allclose(out.soft_labels.sum(1), torch.ones(16))


def test_mix_groups_mix_within_the_group():
    x, y = batch(b=32)
    plan = plan_for(b=32, mixup=0.8, mix_group=8)
    out = apply_tail(x, y, plan, 10, 0.0)
    xn = normalize(x)
    for g in range(4):
        rows = slice(8 * g, 8 * g + 8)
        lam = float(plan.lam[8 * g])
        assert torch.allclose(out.images[rows], lam * xn[rows] + (1 - lam) * xn[rows].flip(0), atol=1e-6)


def test_erasing_only_inside_its_box_with_keyed_noise():
    x, y = batch(b=64, s=32)
    plan = plan_for(b=64, s=32, reprob=0.5)
    out = apply_tail(x, y, plan, 10, 0.0).images
    xn = normalize(x)
    again = apply_tail(x, y, plan, 10, 0.0).images
    assert torch.equal(out, again)
    erased = 0
    for i in range(64):
        top, left, h, w = (int(v) for v in plan.erase[i])
        mask = torch.zeros(32, 32, dtype=torch.bool)
        mask[top:top + h, left:left + w] = True
        assert torch.equal(out[i][:, ~mask], xn[i][:, ~mask])
        if h:
            erased += 1
            assert not torch.allclose(out[i][:, mask], xn[i][:, mask])
    assert erased > 10


def test_erase_noise_is_standard_normal_and_keyed():
    pos = torch.arange(64)
    z = erase_noise(1, 2, pos, (3, 32, 32))
    assert torch.equal(z, erase_noise(1, 2, pos, (3, 32, 32)))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert float((z.abs() > 3).float().mean()) == pytest.approx(0.0027, abs=0.0008)
    other = erase_noise(1, 3, pos, (3, 32, 32))
    assert float(torch.corrcoef(torch.stack([z.flatten(), other.flatten()]))[0, 1]) < 0.01
    # each sample's noise depends only on its own key, so a shard computes the same values
    assert torch.equal(erase_noise(1, 2, pos[5:9], (3, 32, 32)), z[5:9])


def test_tail_casts_to_compute_dtype():
    x, y = batch()
    out = apply_tail(x, y, plan_for(mixup=0.8), 10, 0.1, dtype=torch.bfloat16)
    assert out.images.dtype == torch.bfloat16 and out.soft_labels.dtype == torch.float32


def test_box_noise_is_the_full_noise_cropped():
    """The CPU path hashes only the erased box; the GPU path hashes whole images and selects."""
    full = erase_noise(3, 4, torch.tensor([17]), (3, 32, 32))[0]
    box = erase_box_noise(3, 4, 17, 3, 32, (5, 7, 10, 12), torch.device("cpu"))
    assert torch.equal(box, full[:, 5:15, 7:19])


def test_the_gpus_one_pass_ways_equal_the_cpus_pair_by_pair_way():
    """images_whole (what a GPU runs: a pass per stage, a fixed number of kernels) against
    images_by_pairs (what a CPU runs: a row and its partner at a time), on the same batch and
    plan, mixup and cutmix groups both present, and an odd group whose middle row is its own
    partner: the same pixels up to the last bits (erasing's log and cos of another SIMD width;
    the blend's weight a float32 tensor on one side, a Python float on the other)."""
    from fastdeit.pipelines.tail import images_by_pairs, images_whole, tail_inputs
    from fastdeit.runtime.device import to_device

    for b, group in ((64, 8), (45, 9)):
        x, y = batch(b=b, s=32)
        plan = plan_for(b=b, s=32, reprob=0.5, mixup=0.8, cutmix=1.0, mix_group=group)
        assert plan.cutmix.any() and not plan.cutmix.all() and (plan.erase[:, 2] > 0).sum() > 5
        inputs = to_device(tail_inputs(plan, y.numpy()), torch.device("cpu"))
        whole = images_whole(x, plan, inputs)
        by_pairs = images_by_pairs(x, plan)
        assert torch.allclose(by_pairs, whole, atol=1e-5, rtol=0)
        moved = (by_pairs - normalize(x)).abs().amax(dim=(1, 2, 3))
        paired = plan.partner != np.arange(b)  # an odd group's middle row is its own partner
        assert moved[paired].min() > 0.1 and (~paired).sum() == (b // group) * (group % 2)


def test_the_cpus_tail_is_bit_for_bit_a_pass_per_stage():
    """images_by_pairs does per pair what normalize, erasing by box and mixing by group do over
    the batch, with the same float32 operations: the same bits, not nearly."""
    from fastdeit.pipelines.tail import erase_box_noise, images_by_pairs

    x, _ = batch(b=32, s=32)
    for cutmix in (0.0, 1.0):
        plan = plan_for(b=32, s=32, reprob=0.5, mixup=0.0 if cutmix else 0.8, cutmix=cutmix, mix_group=8)
        ref = normalize(x)
        for i in np.flatnonzero(plan.erase[:, 2] > 0):
            top, left, h, w = (int(v) for v in plan.erase[i])
            ref[i, :, top:top + h, left:left + w] = erase_box_noise(plan.seed, plan.epoch, int(plan.pos[i]), 3, 32,
                                                                    (top, left, h, w), x.device)
        mates = torch.from_numpy(plan.partner)
        for g0 in range(0, 32, 8):
            rows = slice(g0, g0 + 8)
            if plan.cutmix[g0]:
                y0, y1, x0, x1 = (int(v) for v in plan.box[g0])
                ref[rows, :, y0:y1, x0:x1] = ref[mates[rows], :, y0:y1, x0:x1]
            else:
                lam = float(plan.lam[g0])
                ref[rows] = torch.add(ref[rows] * lam, ref[mates[rows]], alpha=1.0 - lam)
        assert torch.equal(images_by_pairs(x, plan), ref)
