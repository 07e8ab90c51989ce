"""The checks of a whole config that need nothing but the config: each value in its range,
each choice one of its values, the combinations that cannot train. Run before any work starts;
each fault is one line naming its config key (the CLI shows its flags in their place)."""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Literal

from fastdeit.config.randaugment import parse_rand_augment
from fastdeit.config.schema import TrainConfig, _field_type, check_choice
from fastdeit.errors import ConfigError

# Bounds far above any real run, below what would allocate or loop without end: DeiT trains
# 300-1000 epochs at 224-384 px with global batches of 1-16k.
MAX_EPOCHS = 100_000
MAX_IMG_SIZE = 8192
MAX_BATCH = 1 << 24


def validate(cfg: TrainConfig) -> None:
    """Every check that needs only the config, before any work starts. Messages name config
    keys (the CLI shows its flags in their place)."""
    _check_choices(cfg)
    d = cfg.data
    m = cfg.model
    o = cfg.optim
    s = cfg.sched
    a = cfg.aug
    k = cfg.distill
    r = cfg.run
    checks: list[tuple[bool, str, str]] = [
        (d.img_size >= 8, "data.img_size", f"must be at least 8, got {d.img_size}"),
        (d.img_size <= MAX_IMG_SIZE, "data.img_size", f"must be at most {MAX_IMG_SIZE}, got {d.img_size}"),
        (0.1 < d.crop_pct <= 1.0, "data.crop_pct", f"must be in (0.1, 1], got {d.crop_pct}"),
        (d.workers >= 0, "data.workers", "must be >= 0"),
        (d.read_workers >= 0, "data.read_workers", "must be >= 0 (0: read in the training thread)"),
        (d.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1"),
        (m.patch_size >= 1, "model.patch_size", "must be >= 1"),
        (0.0 <= m.drop_path < 1.0, "model.drop_path", "must be in [0, 1)"),
        (0.0 < m.ema_decay < 1.0, "model.ema_decay", "must be in (0, 1)"),
        (0.0 < m.width <= 4.0, "model.width", f"must be in (0, 4], got {m.width}"),
        (o.lr > 0 and o.base_batch > 0, "optim.lr", "and optim.base_batch must be positive"),
        (o.weight_decay >= 0 and o.clip_grad >= 0, "optim.weight_decay", "and optim.clip_grad must be >= 0"),
        (s.epochs >= 1, "sched.epochs", f"must be >= 1, got {s.epochs}"),
        (s.epochs <= MAX_EPOCHS, "sched.epochs", f"must be at most {MAX_EPOCHS:,}, got {s.epochs}"),
        (0 <= s.warmup_epochs <= s.epochs, "sched.warmup_epochs", "must be between 0 and sched.epochs"),
        (0 < a.scale[0] <= a.scale[1] <= 1.0, "aug.scale", f"must satisfy 0 < lo <= hi <= 1, got {a.scale}"),
        (0 < a.ratio[0] <= a.ratio[1], "aug.ratio", f"must satisfy 0 < lo <= hi, got {a.ratio}"),
        (all(0 <= p <= 1 for p in (a.hflip, a.reprob, a.switch_prob)), "aug.hflip",
         "aug.reprob and aug.switch_prob are probabilities in [0, 1]"),
        (a.mixup >= 0 and a.cutmix >= 0, "aug.mixup", "and aug.cutmix are Beta parameters, >= 0"),
        (0 <= a.smoothing < 1, "aug.smoothing", "must be in [0, 1)"),
        (not a.three_augment or not a.rand_augment, "aug.three_augment",
         f"replaces RandAugment, as in DeiT III: set aug.rand_augment= (empty), not {a.rand_augment!r}"),
        (0 <= a.color_jitter <= 1, "aug.color_jitter", f"must be in [0, 1], got {a.color_jitter}"),
        (not a.simple_crop or k.targets != "labelmap", "aug.simple_crop",
         "pads and shifts the resized image, which a label map's crop box cannot describe: "
         "use distill.targets=live or replay"),
        (a.repeated_aug >= 1, "aug.repeated_aug", "must be >= 1 (1 = off)"),
        (a.mix_group >= 1, "aug.mix_group", "must be >= 1"),
        (0 <= k.alpha <= 1, "distill.alpha", f"must be in [0, 1], got {k.alpha}"),
        (k.tau > 0, "distill.tau", f"must be positive, got {k.tau}"),
        (k.targets != "replay" or bool(k.teacher_cache), "distill.targets",
         "replay needs distill.teacher_cache CACHE (build one with fastdeit cache-teacher --mode replay)"),
        (k.topk >= 1 and k.labelmap_size >= 0 and k.agreement_batches >= 0 and k.cache_shard_rows >= 1
         and k.teacher_img_size >= 0,
         "distill.topk", "must be >= 1, distill.labelmap_size and distill.agreement_batches >= 0, "
                         "distill.cache_shard_rows >= 1"),
        (k.base_loss != "bce" or a.smoothing == 0, "distill.base_loss",
         f"bce makes every target > 0 a positive, as the official code does: with aug.smoothing {a.smoothing} every "
         f"class would be one; set aug.smoothing=0 (the DeiT III recipe's)"),
        (k.mode == "none" or bool(k.teacher or k.teacher_ckpt), "distill.mode",
         f"{k.mode} needs a teacher: set distill.teacher NAME and/or distill.teacher_ckpt PATH"),
        (r.batch_size >= 1, "run.batch_size", f"must be >= 1, got {r.batch_size}"),
        (r.batch_size <= MAX_BATCH, "run.batch_size", f"must be at most {MAX_BATCH:,}, got {r.batch_size}"),
        (r.accum_steps >= 1, "run.accum_steps", f"must be >= 1 (1: no accumulation), got {r.accum_steps}"),
        (r.log_every >= 1 and r.ckpt_every >= 0 and r.eval_every >= 1, "run.log_every",
         "and run.eval_every must be >= 1, run.ckpt_every >= 0"),
    ]
    for ok, key, text in checks:
        if not ok:
            raise ConfigError(key, text)
    if (a.mixup > 0 or a.cutmix > 0) and a.mix_group % 2:
        raise ConfigError("aug.mix_group", f"must be even when mixup/cutmix is on (partners pair up), "
                                           f"got {a.mix_group}")
    if r.batch_size % a.mix_group:
        raise ConfigError("run.batch_size", f"{r.batch_size} is not a multiple of aug.mix_group {a.mix_group}: "
                                            f"mixup/cutmix pairs samples within groups of {a.mix_group}")
    if a.rand_augment:
        parse_rand_augment(a.rand_augment)


def _check_choices(cfg: TrainConfig) -> None:
    """Every Literal field holds one of its values (a config built in code skips _coerce)."""
    for sec in fields(cfg):
        section = getattr(cfg, sec.name)
        for f in fields(section):
            typ = _field_type(type(section), f.name)
            if typing.get_origin(typ) is Literal:
                check_choice(f"{sec.name}.{f.name}", getattr(section, f.name), typ)
