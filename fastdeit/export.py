"""`fastdeit export RUN --format hf|timm|safetensors --out DIR`: a trained student for the
tools its users live in.

hf:          a Hugging Face `transformers` folder: `DeiTForImageClassificationWithTeacher` for a
             distilled student; a plain one as `ViTForImageClassification`, as the Hub holds
             the official plain DeiTs (transformers' DeiT models always carry a distillation
             token, which would change a plain model's attention); `id2label` from the run's
             classes, and an image processor set to fastdeit's eval transform.
timm:        timm's folder format (`config.json` + `model.safetensors`), which
             `timm.create_model("local-dir:DIR")` builds with its classes and eval settings.
safetensors: the state dict alone, timm's keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdeit.config import IMAGENET_MEAN, IMAGENET_STD
from fastdeit.errors import UserError
from fastdeit.evaluation import load_for_inference
from fastdeit.models import is_distilled, timm_name
from fastdeit.rundir import atomic_write_text


def _vit_shape(model: nn.Module) -> dict[str, int]:
    block = model.blocks[0]
    return {"hidden_size": model.embed_dim, "num_hidden_layers": len(model.blocks),
            "num_attention_heads": block.attn.num_heads, "intermediate_size": block.mlp.fc1.out_features,
            "patch_size": model.patch_embed.patch_size[0]}


# Block parameter names: timm's -> transformers' (v5 names; v4 names where the model has them).
_BLOCK_V5 = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "q": "attention.q_proj", "k": "attention.k_proj",
             "v": "attention.v_proj"}
_BLOCK_V4 = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "q": "attention.attention.query",
             "k": "attention.attention.key", "v": "attention.attention.value"}


def hf_state_dict(sd: dict[str, torch.Tensor], depth: int, distilled: bool, v4: bool) -> dict[str, torch.Tensor]:
    """timm ViT/DeiT keys -> transformers' (DeiT with teacher, or ViT) keys; qkv split in three."""
    pre = "deit" if distilled else "vit"
    names, layer = (_BLOCK_V4, f"{pre}.encoder.layer") if v4 else (_BLOCK_V5, f"{pre}.layers")
    out = {f"{pre}.embeddings.cls_token": sd["cls_token"], f"{pre}.embeddings.position_embeddings": sd["pos_embed"],
           f"{pre}.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           f"{pre}.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           f"{pre}.layernorm.weight": sd["norm.weight"], f"{pre}.layernorm.bias": sd["norm.bias"]}
    for i in range(depth):
        for part in ("weight", "bias"):
            for ours in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2"):
                out[f"{layer}.{i}.{names[ours]}.{part}"] = sd[f"blocks.{i}.{ours}.{part}"]
            q, k, v = sd[f"blocks.{i}.attn.qkv.{part}"].chunk(3, dim=0)  # [3 * dim, ...] -> 3 x [dim, ...]
            for name, t in (("q", q), ("k", k), ("v", v)):
                out[f"{layer}.{i}.{names[name]}.{part}"] = t.clone()
    if distilled:
        out["deit.embeddings.distillation_token"] = sd["dist_token"]
        for part in ("weight", "bias"):
            out[f"cls_classifier.{part}"] = sd[f"head.{part}"]
            out[f"distillation_classifier.{part}"] = sd[f"head_dist.{part}"]
    else:
        out.update({"classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]})
    return out


def _export_hf(model: nn.Module, classes: list[str], img_size: int, crop_pct: float, out: Path) -> None:
    try:
        import transformers
    except ImportError:
        raise UserError("--format hf needs Hugging Face transformers: pip install transformers") from None
    distilled = is_distilled(model)
    labels = {"id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)}}
    common = {**_vit_shape(model), "image_size": img_size, "layer_norm_eps": 1e-6, "hidden_act": "gelu",
              "qkv_bias": True, **labels}
    if distilled:
        config = transformers.DeiTConfig(**common)
        hf = transformers.DeiTForImageClassificationWithTeacher(config)
    else:
        config = transformers.ViTConfig(**common)
        hf = transformers.ViTForImageClassification(config)
    v4 = any(".encoder.layer." in k for k in hf.state_dict())
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.state_dict(), len(model.blocks), distilled, v4),
                                             strict=False)
    if [k for k in missing if "pooler" not in k] or unexpected:
        raise RuntimeError(f"the export misses {missing[:3]} and has no place for {unexpected[:3]}")
    hf.save_pretrained(out)
    processor = transformers.DeiTImageProcessor(
        size={"shortest_edge": int(img_size / crop_pct)}, crop_size={"height": img_size, "width": img_size},
        resample=3, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))  # 3: bicubic, as evaluation
    processor.save_pretrained(out)


def _timm_config(model: nn.Module, name: str, classes: list[str], img_size: int, crop_pct: float) -> dict[str, Any]:
    """timm's config.json: the architecture and the arguments it was built with, the eval
    settings, the class names."""
    return {"architecture": name, "num_classes": len(classes), "label_names": classes,
            "model_args": {"img_size": img_size, "patch_size": model.patch_embed.patch_size[0],
                           "embed_dim": model.embed_dim, "depth": len(model.blocks),
                           "num_heads": model.blocks[0].attn.num_heads},
            "pretrained_cfg": {"input_size": [3, img_size, img_size], "crop_pct": crop_pct, "interpolation": "bicubic",
                               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": len(classes)}}


def export(ckpt: Path, fmt: str, out: Path, ema: bool = False) -> list[Path]:
    """Write the checkpoint's student in `fmt` into `out`; returns the files written."""
    from safetensors.torch import save_file

    loaded = load_for_inference(ckpt, None, use_ema=ema)
    model, name = loaded.model, timm_name(loaded.name)
    if not hasattr(model, "blocks") and fmt != "safetensors":
        raise UserError(f"--format {fmt} exports DeiT/ViT students; {name} is not one: use --format safetensors")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: pick a new folder")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "hf":
        _export_hf(model, loaded.classes, loaded.img_size, loaded.crop_pct, out)
    elif fmt == "timm":
        save_file(state, str(out / "model.safetensors"))
        config = _timm_config(model, name, loaded.classes, loaded.img_size, loaded.crop_pct)
        atomic_write_text(json.dumps(config, indent=1), out / "config.json")
    else:
        save_file(state, str(out / "model.safetensors"), metadata={"architecture": name})
    return sorted(p for p in out.iterdir() if p.is_file())
