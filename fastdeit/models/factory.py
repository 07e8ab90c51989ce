"""Students (timm DeiT, distilled or not) and teachers (any timm classifier).

The ViT is timm's: state_dict keys stay those of timm's deit_*_patch16_* models, so
official DeiT checkpoints ({"model": state_dict}) load, with the position embedding
resampled when the grid differs (fine-tuning at another size).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.utils import reparameterize_model
from torch import nn

from fastdeit.config.schema import AttnBackend, CompileMode, DistillConfig, ModelConfig, choices
from fastdeit.errors import ConfigError, UserError
from fastdeit.training.rundir import model_config_of, read_weights

DEIT_SIZES = ("tiny", "small", "base")
# DeiT III's students (LayerScale ViTs, no distillation token) by size, as timm names them
DEIT3 = {"small": "deit3_small_patch16_224", "medium": "deit3_medium_patch16_224", "base": "deit3_base_patch16_224",
         "large": "deit3_large_patch16_224", "huge": "deit3_huge_patch14_224"}


def timm_name(name: str) -> str:
    """`deit_tiny` -> `deit_tiny_patch16_224`, `deit_small_distilled` -> its distilled twin,
    `deit3_small` -> `deit3_small_patch16_224`; full timm names pass through. Patch and image
    size are set separately."""
    for size in DEIT_SIZES:
        for suffix in ("", "_distilled"):
            if name == f"deit_{size}{suffix}":
                return f"deit_{size}{suffix}_patch16_224"
    return DEIT3.get(name.removeprefix("deit3_"), name) if name.startswith("deit3_") else name


def is_vit(name: str) -> bool:
    """timm's VisionTransformer family (DeiT, DeiT III, ViT): built at any image and patch size."""
    name = timm_name(name)
    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__ in (
        "timm.models.deit", "timm.models.vision_transformer")


def _patch_size(name: str, asked: int) -> int:
    """The patch size to build `name` with: model.patch_size, except that the default (16)
    leaves a name's own patch size (vit_small_patch32_224 stays at 32)."""
    own = re.search(r"patch(\d+)", name)
    return int(own.group(1)) if own and asked == 16 else asked


def is_distilled(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformerDistilled)


def build_model(cfg: ModelConfig, num_classes: int, img_size: int) -> nn.Module:
    """A freshly initialised student or any timm classifier, with `num_classes` outputs."""
    name = timm_name(cfg.name)
    if not timm.is_model(name):
        raise UserError(f"unknown model {cfg.name!r}: use deit_tiny/small/base[_distilled], "
                        f"deit3_small/medium/base/large/huge or a timm classifier name (timm.list_models())")
    kwargs: dict = {"num_classes": num_classes, "drop_path_rate": cfg.drop_path}
    if is_vit(name):
        patch = _patch_size(name, cfg.patch_size)
        if img_size % patch:
            raise ConfigError("data.img_size", f"{img_size} is not a multiple of {name}'s patch size {patch} "
                                               f"(model.patch_size)")
        kwargs.update(img_size=img_size, patch_size=patch)
        for key in ("depth", "embed_dim", "num_heads"):
            if getattr(cfg, key):
                kwargs[key] = getattr(cfg, key)
    elif cfg.depth or cfg.embed_dim or cfg.num_heads:
        raise UserError("model.depth/embed_dim/num_heads apply to DeiT / ViT models only")
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


def load_weights(model: nn.Module, path: Path) -> None:
    """Load weights to fine-tune from: the position embedding is resampled to the model's
    grid; classifier heads of another class count are left freshly initialised."""
    sd, _ = read_weights(path)
    fit_state_dict(sd, model, str(path), new_head_ok=True)


def named_model(meta: dict[str, Any], asked: str, source: Path | str, flag: str) -> str:
    """The model to build a file's weights as: the one a fastdeit checkpoint names (asking for
    another is one line: never silently another), or for a saved model folder (whose config
    gives the shape) the family asked for (a ViT folder as vit_*)."""
    named = model_config_of(meta).name
    if not asked or timm_name(asked) == timm_name(named):
        return named
    if meta.get("folder"):
        return asked
    raise UserError(f"{source} is a fastdeit checkpoint of {named}, not {asked}: drop {flag} (the checkpoint "
                    f"names its model)")


def fit_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, source: str, new_head_ok: bool,
                   flag: str = "--model") -> None:
    """Load a file's weights into `model`, or say in one line what does not fit (distilled or
    not, patch size, classes, width/depth) and what to do (`flag`: the option naming the
    model). ViT position embeddings are resampled to the model's grid as the official
    fine-tuning does it (bicubic, no antialiasing; class/distillation positions kept)."""
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    if isinstance(model, VisionTransformer):
        if ("dist_token" in sd) != is_distilled(model):
            held = "a distilled DeiT (dist_token, head_dist)" if "dist_token" in sd else \
                "a DeiT without a distillation token"
            raise UserError(f"{source} holds {held} and {name} is {'' if is_distilled(model) else 'not '}distilled: "
                            f"use the {'distilled' if 'dist_token' in sd else 'plain'} model of that size")
        pe, own_pe = sd.get("patch_embed.proj.weight"), model.patch_embed.proj.weight
        if pe is not None and pe.shape[-1] != own_pe.shape[-1]:
            raise UserError(f"{source} was trained with patch size {pe.shape[-1]}, the model has patch size "
                            f"{own_pe.shape[-1]}: set --patch-size {pe.shape[-1]} (model.patch_size)")
    own = model.state_dict()
    heads = {k for k, v in sd.items() if k.startswith("head") and k in own and v.shape[:1] != own[k].shape[:1]}
    if heads and not new_head_ok:
        k = sorted(heads)[0]
        raise UserError(f"{source} predicts {sd[k].shape[0]} classes, the model {own[k].shape[0]}: evaluate on "
                        f"data of its classes, or fine-tune from it with --set model.init={source}")
    for k, v in sd.items():
        if k in own and k not in heads and k != "pos_embed" and v.shape != own[k].shape:
            raise UserError(f"{source} does not fit {name}: {k} is {tuple(v.shape)} in the file, "
                            f"{tuple(own[k].shape)} in the model: use the model it was trained as ({flag})")
    if isinstance(model, VisionTransformer):
        sd = checkpoint_filter_fn(sd, model, antialias=False)
    missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if k not in heads}, strict=False)
    missing = [k for k in missing if not (new_head_ok and k.startswith("head"))]
    if missing or unexpected:
        raise UserError(f"{source} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def set_trainable(model: nn.Module, train_only: str) -> int:
    """Freeze all but what `train_only` names (config.TrainOnly); returns the trainable
    parameter count. `attn` is the official --attn-only: the attention layers, the heads and
    the position embedding train, the patch embedding and the rest stay frozen."""
    if train_only != "all":
        for name, p in model.named_parameters():
            head = name.split(".")[0] in ("head", "head_dist", "fc", "classifier")
            p.requires_grad_(head or (train_only == "attn" and (".attn." in name or name == "pos_embed")))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
        sd, meta = read_weights(Path(cfg.teacher_ckpt))
        model_cfg = model_config_of(meta)
        if meta:
            model_cfg = replace(model_cfg, name=named_model(meta, cfg.teacher, cfg.teacher_ckpt, "--teacher"))
        elif cfg.teacher:
            model_cfg = replace(model_cfg, name=cfg.teacher)
        else:
            raise UserError(f"{cfg.teacher_ckpt} does not name its model: pass --teacher NAME")
        model_cfg = replace(model_cfg, drop_path=0.0, init="", ema=False)
        classes = head_classes(sd) or num_classes
        model = build_model(model_cfg, classes, int(meta.get("img_size", img_size)))
        model.trained_img_size = meta.get("img_size")  # label maps are only as good as this scale
        fit_state_dict(sd, model, str(cfg.teacher_ckpt), new_head_ok=False, flag="--teacher")
    classes = getattr(model, "num_classes", None)
    if classes != num_classes:
        raise UserError(f"teacher predicts {classes} classes but the data has {num_classes}: "
                        f"distill from a teacher trained on these classes")
    if is_distilled(model):
        model.set_distilled_training(False)
    model.fastdeit_name = model_cfg.name if cfg.teacher_ckpt else cfg.teacher  # caches record it
    model.eval().requires_grad_(False)
    return model.to(device)


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and bytes, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def teacher_sha256(teacher: nn.Module) -> str:
    """The hash of the teacher's weights as trained (before `ready_teacher` folded anything)."""
    return getattr(teacher, "fastdeit_sha256", None) or weights_sha256(teacher.state_dict())


def ready_teacher(teacher: nn.Module, device: torch.device, compile_mode: CompileMode) -> nn.Module:
    """The frozen teacher at full speed for the step, the same wherever it runs (a live run,
    a cache build): BatchNorm folded where timm can (reparameterize_model), channels_last on
    CUDA (its input follows, in LiveTeacher), compiled in the student's mode. The hash of its
    weights is taken first: caches are keyed by the weights as trained."""
    teacher.fastdeit_sha256 = teacher_sha256(teacher)
    teacher = reparameterize_model(teacher, inplace=True).eval().requires_grad_(False)
    if device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    compile_model(teacher, compile_mode)
    return teacher


def head_classes(sd: dict[str, torch.Tensor]) -> int | None:
    """The class count of a timm classifier state_dict, read off its head's weight."""
    for key in ("head.fc.weight", "head.weight", "fc.weight", "classifier.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    return None


class FastAttention(Attention):
    """timm's Attention with the attention product taken by a chosen backend. Instances are
    made by swapping the class of timm's own modules, so parameters and state_dict keys
    stay exactly timm's."""

    backend: str = "sdpa"
    attend = staticmethod(F.scaled_dot_product_attention)  # replaced per instance by set_attention

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal or getattr(self, "gate", None) is not None \
                or (self.training and self.attn_drop.p > 0):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape  # [B, N, C]: batch, tokens (patches + class and distillation tokens), channels
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, D]
        q, k = self.q_norm(q), self.k_norm(k)
        x = self.attend(q, k, v, scale=self.scale)  # [B, H, N, D]
        x = x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)  # [B, N, H * D]
        x = getattr(self, "norm", nn.Identity())(x)
        return self.proj_drop(self.proj(x))


def set_attention(model: nn.Module, backend: AttnBackend) -> int:
    """Route every timm Attention of `model` through `backend` (not `auto`); returns how many."""
    if backend not in choices(AttnBackend) or backend == "auto":
        raise ConfigError("model.attn", f"must be one of {', '.join(choices(AttnBackend))}, got {backend!r}")
    if backend == "sdpa":  # PyTorch's own: the kernels module (Triton, its custom ops) is imported only when asked for
        attend = F.scaled_dot_product_attention
    else:
        from fastdeit.kernels import attention as kernels

        attend = partial(kernels.attention, backend=backend)
    count = 0
    for module in model.modules():
        if type(module) in (Attention, FastAttention):
            module.__class__ = FastAttention
            module.backend, module.attend = backend, attend
            count += 1
    return count


def choose_attention(model: nn.Module, requested: AttnBackend, batch: int, dtype: torch.dtype, device: torch.device,
                     remembered: dict[str, str]) -> tuple[str | None, dict[str, float]]:
    """Set the model's attention backend: the requested one, or for `auto` the fastest
    correct one measured on this device and shape (looked up first in `remembered`, a
    {key: backend} map the caller keeps on disk; a new choice is added to it). Returns
    (backend, milliseconds per forward + backward of each candidate measured now); backend
    None for models without attention."""
    shape = attention_shape(model)
    if shape is None:
        return None, {}
    times: dict[str, float] = {}
    backend = requested
    if requested == "auto":
        from fastdeit.kernels.attention import pick_backend

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        key = f"{name}|{batch}|{'|'.join(map(str, shape))}|{dtype}"
        if key in remembered:
            backend = remembered[key]
        else:
            backend, times = pick_backend(batch, *shape, dtype, device)
            remembered[key] = backend
    if backend == "flex" and device.type != "cuda":
        raise ConfigError("model.attn", "flex trains on CUDA only: FlexAttention has no backward pass on a CPU; "
                                        "use sdpa, triton or math")
    set_attention(model, backend)
    return backend, times


def compile_model(model: nn.Module, mode: CompileMode) -> str:
    """torch.compile the module in place (state_dict keys unchanged), static shapes. `auto` is
    `default`: on an H200, max-autotune-no-cudagraphs spent over five minutes autotuning DeiT-S's
    GEMMs before its first step and picked cuBLAS for most of them, while `default` compiled in
    under a minute and trained 1.6x faster than eager (benchmarks/results/*nvidia-h200*).
    Returns the mode used."""
    if mode == "none":
        return mode
    if mode == "auto":
        mode = "default"
    model.compile(mode=mode, dynamic=False)
    return mode


def attention_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(heads, tokens, head_dim) of the model's attention layers, or None for a convnet."""
    for module in model.modules():
        if isinstance(module, Attention) and hasattr(model, "patch_embed"):
            tokens = getattr(model, "num_prefix_tokens", 1) + model.patch_embed.num_patches
            return module.num_heads, tokens, module.head_dim
    return None


def head_logits(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval-mode logits of each head: for distilled models `cls`, `dist` and their mean
    `joint` (what the model returns in eval); otherwise only `joint`. Eager methods, so a
    compiled forward is not recompiled for eval."""
    if not is_distilled(model):
        return {"joint": model.forward_head(model.forward_features(x))}
    feats = model.forward_features(x)
    cls, dist = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
    return {"cls": cls, "dist": dist, "joint": (cls + dist) / 2}
