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


def _deit3() -> TrainConfig:
    """DeiT III's ImageNet-1k pre-training of ViT-S at 224 px, as the official command
    (README_revenge.md): LAMB at lr 4e-3 for batch 2,048, not scaled by the batch; weight decay
    0.05, 800 epochs, 5 warm-up epochs from 1e-6; 3-Augment (colour jitter 0.3) in place of
    RandAugment, no erasing, no smoothing, mixup 0.8 and cutmix 1.0, repeated augmentation;
    drop path 0.05; binary cross-entropy; evaluation at crop 1.0. No teacher. ViT-B and -L take
    192 px, lr 3e-3 and drop path 0.2 / 0.45, ViT-H 160 px and 0.6 (docs/recipes.md)."""
    base = TrainConfig()
    return replace(base, data=replace(base.data, img_size=224, crop_pct=1.0),
                   model=replace(base.model, name="deit3_small", drop_path=0.05),
                   optim=replace(base.optim, opt="lamb", lr=4e-3, scale_lr=False, weight_decay=0.05),
                   sched=replace(base.sched, epochs=800, warmup_epochs=5.0, warmup_lr=1e-6, min_lr=1e-5),
                   aug=replace(base.aug, rand_augment="", three_augment=True, color_jitter=0.3, reprob=0.0,
                               smoothing=0.0, mixup=0.8, cutmix=1.0, repeated_aug=3),
                   distill=replace(base.distill, mode="none", base_loss="bce"),
                   run=replace(base.run, batch_size=2048))


def _deit3_finetune() -> TrainConfig:
    """DeiT III's fine-tuning at 224 px of a ViT-B pre-trained at 192 (`--set model.init=`), as
    the official command: AdamW at lr 1e-5 for batch 512, not scaled; weight decay 0.1, 20
    epochs, 5 warm-up epochs from 1e-6; RandAugment rand-m9-mstd0.5-inc1, smoothing 0.1, no
    erasing, mixup 0.8 and cutmix 1.0, no repeated augmentation; drop path 0.2; cross-entropy;
    evaluation at crop 1.0."""
    base = TrainConfig()
    return replace(base, data=replace(base.data, img_size=224, crop_pct=1.0),
                   model=replace(base.model, name="deit3_base", drop_path=0.2),
                   optim=replace(base.optim, opt="adamw", lr=1e-5, scale_lr=False, weight_decay=0.1),
                   sched=replace(base.sched, epochs=20, warmup_epochs=5.0, warmup_lr=1e-6, min_lr=1e-5),
                   aug=replace(base.aug, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.0, smoothing=0.1,
                               mixup=0.8, cutmix=1.0, repeated_aug=1),
                   distill=replace(base.distill, mode="none"),
                   run=replace(base.run, batch_size=512))


RECIPES = {"deit": _deit, "demo": _demo, "deit-finetune-384": _finetune_384, "transfer": _transfer,
           "deit3": _deit3, "deit3-finetune": _deit3_finetune}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]()
