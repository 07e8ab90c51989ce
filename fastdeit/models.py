"""Students (timm DeiT, distilled or not) and teachers (any timm classifier).

The ViT is timm's: state_dict keys stay those of timm's deit_*_patch16_* models, so
official DeiT checkpoints ({"model": state_dict}) load, with the position embedding
resampled when the grid differs (fine-tuning at another size).
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from fastdeit.config import DistillConfig, ModelConfig
from fastdeit.errors import UserError

DEIT_SIZES = ("tiny", "small", "base")


def timm_name(name: str) -> str:
    """`deit_tiny` -> `deit_tiny_patch16_224`, `deit_small_distilled` -> its distilled twin;
    full timm names pass through. Patch and image size are set separately."""
    for size in DEIT_SIZES:
        for suffix in ("", "_distilled"):
            if name == f"deit_{size}{suffix}":
                return f"deit_{size}{suffix}_patch16_224"
    return name


def is_vit(name: str) -> bool:
    return timm_name(name).startswith("deit_")


def is_distilled(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformerDistilled)


def build_model(cfg: ModelConfig, num_classes: int, img_size: int) -> nn.Module:
    """A freshly initialised student or any timm classifier, with `num_classes` outputs."""
    name = timm_name(cfg.name)
    if not timm.is_model(name):
        raise UserError(f"unknown model {cfg.name!r}: use deit_tiny/small/base[_distilled] "
                        f"or a timm classifier name (timm.list_models())")
    kwargs: dict = {"num_classes": num_classes, "drop_path_rate": cfg.drop_path}
    if is_vit(name):
        if img_size % cfg.patch_size:
            raise UserError(f"--img-size {img_size} is not a multiple of model.patch_size {cfg.patch_size}")
        kwargs.update(img_size=img_size, patch_size=cfg.patch_size)
        for key in ("depth", "embed_dim", "num_heads"):
            if getattr(cfg, key):
                kwargs[key] = getattr(cfg, key)
    elif cfg.depth or cfg.embed_dim or cfg.num_heads:
        raise UserError("model.depth/embed_dim/num_heads apply to DeiT models only")
    if cfg.width != 1.0:
        if not name.startswith("resnet") or name.startswith("resnetv2"):
            raise UserError(f"model.width applies to timm ResNets (resnet18, resnet50, ...), not {cfg.name!r}")
        kwargs.update(channels=tuple(max(8, round(c * cfg.width)) for c in (64, 128, 256, 512)),
                      stem_width=max(8, round(64 * cfg.width)))
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(f"cannot build {cfg.name!r} with {kwargs}: {e}") from None
    if is_distilled(model):
        model.set_distilled_training(True)
    if cfg.init:
        load_weights(model, Path(cfg.init))
    return model


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model weights, meta) from an official DeiT .pth ({"model": sd}), a fastdeit checkpoint
    (its meta names the model config and image size), or a bare state_dict. Loaded with
    weights_only=True: a weights file cannot run code."""
    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights from {path}: {str(e).splitlines()[0]}") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} holds no model state_dict")
    meta = obj.get("meta", {}) if isinstance(obj.get("meta"), dict) else {}
    return sd, meta


def load_weights(model: nn.Module, path: Path) -> None:
    """Load weights to fine-tune from: the position embedding is resampled to the model's
    grid; classifier heads of another class count are left freshly initialised."""
    sd, _ = read_checkpoint(path)
    if isinstance(model, VisionTransformer):
        sd = checkpoint_filter_fn(sd, model)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith("head") and k in own and v.shape != own[k].shape)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise UserError(f"{path} does not fit {type(model).__name__}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_teacher(cfg: DistillConfig, num_classes: int, img_size: int, device: torch.device) -> nn.Module:
    """The frozen teacher in eval mode, from a fastdeit checkpoint (its config is inside), or
    --teacher NAME with --teacher-ckpt PATH (e.g. official weights), or NAME alone (timm's
    pretrained weights, downloaded)."""
    if not cfg.teacher_ckpt:
        if not timm.is_model(timm_name(cfg.teacher)):
            raise UserError(f"unknown teacher model {cfg.teacher!r}")
        try:
            model = timm.create_model(timm_name(cfg.teacher), pretrained=True)
        except Exception as e:
            raise UserError(f"cannot fetch pretrained weights of teacher {cfg.teacher!r} "
                            f"({str(e).splitlines()[0]}); pass --teacher-ckpt PATH") from None
    else:
        sd, meta = read_checkpoint(Path(cfg.teacher_ckpt))
        known = {f.name for f in fields(ModelConfig)}
        model_cfg = ModelConfig(**{k: v for k, v in meta.get("model", {}).items() if k in known})
        if cfg.teacher:
            model_cfg = replace(model_cfg, name=cfg.teacher)
        elif not meta:
            raise UserError(f"{cfg.teacher_ckpt} does not name its model: pass --teacher NAME")
        model_cfg = replace(model_cfg, drop_path=0.0, init="", ema=False)
        classes = _head_classes(sd) or num_classes
        model = build_model(model_cfg, classes, int(meta.get("img_size", img_size)))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"{cfg.teacher_ckpt} does not fit teacher {model_cfg.name!r}: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    classes = getattr(model, "num_classes", None)
    if classes != num_classes:
        raise UserError(f"teacher predicts {classes} classes but the data has {num_classes}: "
                        f"distill from a teacher trained on these classes")
    if is_distilled(model):
        model.set_distilled_training(False)
    model.fastdeit_name = model_cfg.name if cfg.teacher_ckpt else cfg.teacher  # caches record it
    model.eval().requires_grad_(False)
    return model.to(device)


def _head_classes(sd: dict[str, torch.Tensor]) -> int | None:
    """The class count of a timm classifier state_dict, read off its head's weight."""
    for key in ("head.fc.weight", "head.weight", "fc.weight", "classifier.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    return None


def head_logits(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval-mode logits of each head: for distilled models `cls`, `dist` and their mean
    `joint` (what the model returns in eval); otherwise only `joint`."""
    if not is_distilled(model):
        return {"joint": model(x)}
    feats = model.forward_features(x)
    cls, dist = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
    return {"cls": cls, "dist": dist, "joint": (cls + dist) / 2}
