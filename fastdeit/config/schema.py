"""Typed configuration: frozen dataclasses per section, overrides, validation (the recipes
that fill them are in config/recipes.py).

Config flows down: the CLI builds a TrainConfig from a recipe plus flags and `--set
section.key=value` overrides, the trainer writes the resolved config.json, and each
component receives only its own section. Derived values (scaled lr, per-rank batch,
steps per epoch) are functions of (config, world), never stored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from fastdeit.errors import ConfigError, UserError, clipped, shown

# The allowed values of every choice, defined once: config validation, the CLI's help and
# checks, and the modules that dispatch on them all read these.
Loader = Literal["auto", "dali", "torch"]  # auto: dali when CUDA and DALI are there, else torch
AttnBackend = Literal["auto", "sdpa", "flex", "triton", "math"]  # auto: the fastest correct one measured
DistillMode = Literal["none", "soft", "hard"]
# The class head's loss: soft-target cross-entropy (DeiT), or binary cross-entropy on the targets
# made 0/1 (> 0), as DeiT III's official --bce-loss
BaseLoss = Literal["ce", "bce"]
TeacherTargets = Literal["live", "replay", "labelmap"]  # where the teacher's predictions come from
CacheMode = Literal["replay", "labelmap"]  # the kinds of teacher cache (`fastdeit cache-teacher --mode`)
Device = Literal["auto", "cpu", "cuda"]
Amp = Literal["auto", "bf16", "fp16", "fp32"]  # auto: bf16 on CUDA, fp32 on a CPU
CompileMode = Literal["none", "auto", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"]
Interpolation = Literal["bicubic", "bilinear"]
LogTo = Literal["none", "tensorboard", "wandb"]  # besides metrics.jsonl
SchedUpdate = Literal["step", "epoch"]  # when the lr changes: every update, or once per epoch (official)
RequeueSignal = Literal["USR1", "USR2", "none"]  # stop after the step and exit 4 ("requeue me"): runtime/signals.py
TrainOnly = Literal["all", "head", "attn"]  # head: a linear probe; attn: the official --attn-only
Head = Literal["cls", "dist", "joint"]  # the heads of a distilled student; joint (their mean) is every model's


def choices(typ: Any) -> tuple[str, ...]:
    """The allowed values of a Literal choice type."""
    return typing.get_args(typ)


def check_choice(name: str, value: str, typ: Any) -> None:
    """One line naming `name` and the allowed values when `value` is not one of them."""
    if value not in choices(typ):
        raise ConfigError(name, f"must be one of {', '.join(choices(typ))}, got {shown(value)}")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# No integer a config takes (counts, sizes, seeds) is larger; a bigger one is a typo or an attack.
MAX_INT = 2**53
# A run's config.json also records what wrote it (the fastdeit version, what the run picked and
# why) under this key; reading a config skips it, so the file reruns the run as it is.
PROVENANCE = "provenance"


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    img_size: int = 224
    crop_pct: float = 0.875  # eval: resize the shorter side to img_size / crop_pct, then centre-crop
    workers: int = 4  # torch loader processes (0 = in the main process), or DALI CPU threads
    eval_batch_size: int = 256
    loader: Loader = "auto"
    skip_list: str = ""  # a file of paths (as `fastdeit check-data` prints them) never to decode
    roi_decode: bool = True  # DALI: decode only the plan's crop box (else the whole image, then crop)
    hw_decode: bool = False  # DALI on a GPU: nvJPEG's hardware decoder for part of each batch (docs/data.md)
    read_workers: int = 2  # DALI: processes that plan batches and read their files, off the training thread


@dataclass(frozen=True)
class ModelConfig:
    name: str = "deit_small_distilled"
    patch_size: int = 16  # ViT students only
    drop_path: float = 0.1
    depth: int = 0  # 0 keeps the architecture's own value; set for tiny test models
    embed_dim: int = 0
    num_heads: int = 0
    width: float = 1.0  # channel multiplier of timm ResNets (the demo's teacher is a half-width resnet18)
    attn: AttnBackend = "auto"
    init: str = ""  # weights to start from: an official DeiT .pth or a fastdeit checkpoint
    ema: bool = False
    ema_decay: float = 0.99996
    # Which parameters train: all; the classifier head(s) only; or, as the official
    # --attn-only, the attention layers, the heads and the position embedding.
    train_only: TrainOnly = "all"


@dataclass(frozen=True)
class OptimConfig:
    opt: str = "adamw"  # any timm optimizer name
    lr: float = 5e-4  # at base_batch; the run uses lr * batch_size / base_batch
    base_batch: int = 512
    scale_lr: bool = True  # false: lr is used as given at any batch (DeiT III's official --unscale-lr)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0  # 0 disables clipping


@dataclass(frozen=True)
class SchedConfig:
    epochs: int = 300
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    # step: the cosine per update (fastdeit's default); epoch: set once per epoch after it, as the
    # official main.py steps timm's scheduler (its lr then trails the per-update one by an epoch)
    update: SchedUpdate = "step"


@dataclass(frozen=True)
class AugConfig:
    """The recipe of the augmentation plan (data/plan.py): every random decision of a batch."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm's grammar; "" disables
    interpolation: Interpolation = "bicubic"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    switch_prob: float = 0.5
    mix_group: int = 64  # mixup/cutmix draw one λ and pair partners within each group
    smoothing: float = 0.1
    repeated_aug: int = 3  # each image this many times per epoch (1 = off)
    # DeiT III's 3-Augment in place of RandAugment: one of grayscale, solarize, Gaussian blur
    # per sample, then ColorJitter(color_jitter) on brightness, contrast and saturation
    three_augment: bool = False
    color_jitter: float = 0.3
    # DeiT III's simple random crop (--src) in place of RandomResizedCrop: resize the shorter
    # side to the image size, pad 4 reflected pixels, crop a random square, flip
    simple_crop: bool = False


@dataclass(frozen=True)
class DistillConfig:
    mode: DistillMode = "none"
    base_loss: BaseLoss = "ce"  # the class head's loss, which distillation wraps (the official base_criterion)
    alpha: float = 0.5
    tau: float = 1.0
    teacher: str = ""  # a timm model name; may be read from a fastdeit teacher checkpoint
    teacher_ckpt: str = ""
    targets: TeacherTargets = "live"
    teacher_cache: str = ""  # the cache folder for replay / labelmap
    topk: int = 5  # logits (replay) or class scores per map cell (labelmap) kept in a cache
    labelmap_size: int = 0  # the teacher's input size when building label maps (0 = data.img_size)
    agreement_batches: int = 4  # labelmap: batches per epoch also run live, to report agreement
    # Rows per shard of a cache this run builds (replay: rounded down to whole global batches).
    # The unit of resuming and of the work split over ranks; a built cache records its own.
    cache_shard_rows: int = 65536
    # The resolution the teacher sees (0: the student's, data.img_size): the batch is resized
    # for the teacher only, e.g. a 224 px teacher for a 384 px fine-tune.
    teacher_img_size: int = 0


@dataclass(frozen=True)
class RunConfig:
    out: str = ""
    seed: int = 0
    device: Device = "auto"
    batch_size: int = 1024  # the global batch: the same samples are seen whatever the world size
    amp: Amp = "auto"
    log_every: int = 20  # steps between metrics.jsonl step records
    ckpt_every: int = 1000  # steps between mid-epoch checkpoints besides epoch ends (0 = epoch ends only)
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    progress: bool = True
    compile: CompileMode = "none"  # auto: default (models.compile_model says why)
    cache_dir: str = ""  # where measured choices (attention backend) are remembered; "" = not on disk
    log: LogTo = "none"  # tensorboard: RUN/tensorboard/ event files; wandb: a Weights & Biases run
    requeue_signal: RequeueSignal = "USR1"  # SLURM's --signal=USR1@120 warns before the time limit
    # Micro-batches per update on each rank: the same update in 1/K of the activation memory
    # (gradients accumulate; DDP all-reduces on the last micro-batch only).
    accum_steps: int = 1


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = {k: v for k, v in d.items() if k != PROVENANCE}  # a run's record of what wrote it, not a setting
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown config section {shown(sorted(unknown, key=str)[0])}; sections: "
                            f"{section_names()}")
        sections = {}
        for f in fields(cls):
            sec_cls = _section_type(f.name)
            values = d.get(f.name, {})
            bad = set(values) - {g.name for g in fields(sec_cls)}
            if bad:
                raise UserError(f"unknown config key {f.name}.{clipped(str(sorted(bad, key=str)[0]))}; {f.name} has: "
                                f"{_keys(sec_cls)}")
            sections[f.name] = sec_cls(**{k: _coerce(f"{f.name}.{k}", v, _field_type(sec_cls, k))
                                          for k, v in values.items()})
        return cls(**sections)


# --- overrides ----------------------------------------------------------------------------

def section_names() -> str:
    return ", ".join(f.name for f in fields(TrainConfig))


def _section_type(name: str) -> type:
    return typing.get_type_hints(TrainConfig)[name]


def _keys(sec_cls: type) -> str:
    return ", ".join(g.name for g in fields(sec_cls))


def _field_type(sec_cls: type, key: str) -> Any:
    return typing.get_type_hints(sec_cls)[key]


def coerce_key(key: str, value: Any, name: str | None = None) -> Any:
    """`value` (a Python value or a --set string) as config key `key`'s declared type; a bad
    one is a UserError naming `name` (default: the key)."""
    section, field = key.split(".")
    return _coerce(name or key, value, _field_type(_section_type(section), field))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a JSON value or a --set string to the field's declared type, or fail clearly."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        check_choice(key, value, typ)
        return value
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
            if abs(number) > MAX_INT:
                raise ConfigError(key, f"must be at most {MAX_INT:,} in size, got {shown(value)}")
            return number
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # inf or nan would surface later as a diverged loss
                raise ConfigError(key, f"must be a finite number, got {shown(value)}")
            return number
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is tuple:
            parts = value.split(",") if isinstance(value, str) else list(value)
            args = typing.get_args(typ)
            if len(parts) != len(args):
                raise ValueError
            return tuple(_coerce(key, p, a) for p, a in zip(parts, args))
        if origin in (typing.Union, types.UnionType):
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(key, f"must be {_type_name(typ)}, got {shown(value)}")


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is tuple:
        return "a comma-separated pair like 0.1,1.0"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.key=value` strings, each converted to the field's type."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set takes section.key=value, got {shown(item)}")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in {f.name for f in fields(TrainConfig)}:
            raise UserError(f"unknown config section {shown(section)} in --set {clipped(item)}; sections: "
                            f"{section_names()}")
        sec = getattr(cfg, section)
        if name not in {f.name for f in fields(sec)}:
            raise UserError(f"unknown config key {shown(key)}; {section} has: {_keys(type(sec))}")
        new = _coerce(key, value, _field_type(type(sec), name))
        cfg = replace(cfg, **{section: replace(sec, **{name: new})})
    return cfg


def with_section(cfg: TrainConfig, section: str, **values: Any) -> TrainConfig:
    """Set typed fields of one section (values that are None are left as they are)."""
    values = {k: v for k, v in values.items() if v is not None}
    return replace(cfg, **{section: replace(getattr(cfg, section), **values)})


# --- derived values (the checks are config/checks.py's) -----------------------------------

def scaled_lr(cfg: TrainConfig) -> float:
    """The DeiT rule: lr scales linearly with the global batch (unless optim.scale_lr is off)."""
    if not cfg.optim.scale_lr:
        return cfg.optim.lr
    return cfg.optim.lr * cfg.run.batch_size / cfg.optim.base_batch


def per_rank_batch(cfg: TrainConfig, world_size: int) -> int:
    b = cfg.run.batch_size
    g = cfg.aug.mix_group
    k = cfg.run.accum_steps
    mixing = cfg.aug.mixup > 0 or cfg.aug.cutmix > 0  # without it, groups pair nothing: a rank needs no whole one
    if mixing and b % (world_size * g):
        raise ConfigError("run.batch_size", f"{b} does not split into {world_size} ranks of whole mix groups of {g}: "
                                            f"make it a multiple of {world_size * g}, or set aug.mix_group to a "
                                            f"divisor of the rank batch (mixup/cutmix pair samples within one)")
    if b % world_size:
        raise ConfigError("run.batch_size", f"{b} does not split into {world_size} ranks: make it a multiple of "
                                            f"{world_size}")
    if (b // world_size) % k:  # the tail mixes the whole rank batch first: micro-batches need not be whole groups
        raise ConfigError("run.accum_steps", f"{k} does not split a rank's batch of {b // world_size} into equal "
                                             f"micro-batches: pick a divisor of {b // world_size}")
    return b // world_size


# The keys that name files or folders: a run's config.json stores them absolute, so that it
# reruns from any working directory (`fastdeit train --config RUN/config.json`).
PATH_KEYS = (("data", "path"), ("data", "skip_list"), ("run", "out"), ("run", "cache_dir"), ("model", "init"),
             ("distill", "teacher_ckpt"), ("distill", "teacher_cache"))


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with every relative path made absolute against the working directory (URLs and
    empty values as they are)."""
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value and "://" not in value:
            cfg = with_section(cfg, section, **{key: os.path.abspath(value)})
    return cfg


def save_json(cfg: TrainConfig, provenance: dict[str, str] | None = None) -> str:
    """The config as JSON, its paths absolute; `provenance` (a run's config.json: the fastdeit
    version, what the run picked and why) under its own key, which reading a config skips."""
    out = with_absolute_paths(cfg).to_dict() | ({PROVENANCE: provenance} if provenance else {})
    return json.dumps(out, indent=2, sort_keys=True)


def load_json(path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read config {path}: {e}") from None
