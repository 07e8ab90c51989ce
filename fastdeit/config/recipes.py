"""The recipes: named TrainConfigs a run starts from (`--recipe`), before its flags and
`--set` overrides."""

from __future__ import annotations

from dataclasses import replace

from fastdeit.config.schema import (
    AugConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SchedConfig,
    TrainConfig,
)
from fastdeit.errors import UserError


def _deit() -> TrainConfig:
    """The paper's ImageNet recipe (Touvron et al. 2021, Table 9), as the defaults above."""
    return TrainConfig()


def _demo() -> TrainConfig:
    """A short schedule on small images for the embedded synthetic data on a CPU: light
    augmentation and small batches, so that a few hundred steps learn something."""
    return TrainConfig(
        data=DataConfig(img_size=64, workers=2, eval_batch_size=250),
        model=ModelConfig(name="deit_tiny_distilled", patch_size=16, drop_path=0.0),
        optim=OptimConfig(lr=4e-3, base_batch=512, weight_decay=0.05),
        sched=SchedConfig(epochs=10, warmup_epochs=1.0, warmup_lr=1e-5, min_lr=1e-5),
        aug=AugConfig(scale=(0.5, 1.0), rand_augment="", reprob=0.0, mixup=0.0, cutmix=0.0, mix_group=16,
                      repeated_aug=1),
        run=RunConfig(batch_size=32, log_every=10, eval_every=5, ckpt_every=0),
    )


def _finetune_384() -> TrainConfig:
    """Fine-tuning at 384 px from 224 px weights (`--set model.init=`), as the official
    repository's command: lr 5e-6 at batch 512, weight decay 1e-8, 30 epochs, min lr 5e-6,
    its default warm-up (5 epochs from 1e-6); augmentation as in training."""
    base = TrainConfig()
    return replace(base, data=replace(base.data, img_size=384),
                   optim=replace(base.optim, lr=5e-6, base_batch=512, weight_decay=1e-8),
                   sched=replace(base.sched, epochs=30, min_lr=5e-6), run=replace(base.run, batch_size=512))


def _transfer() -> TrainConfig:
    """Transfer to a small data set from ImageNet weights (`--set model.init=`), as the DeiT
    authors gave it for CIFAR-10 and Stanford Cars (facebookresearch/deit issue #45): batch
    768, SGD at lr 0.01, weight decay 1e-4, 1,000 epochs, no random erasing and no stochastic
    depth; everything else as the ImageNet recipe."""
    base = TrainConfig()
    return replace(base, model=replace(base.model, drop_path=0.0),
                   optim=replace(base.optim, opt="sgd", lr=0.01, base_batch=768, weight_decay=1e-4),
                   sched=replace(base.sched, epochs=1000), aug=replace(base.aug, reprob=0.0),
                   run=replace(base.run, batch_size=768))


RECIPES = {"deit": _deit, "demo": _demo, "deit-finetune-384": _finetune_384, "transfer": _transfer}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]()
