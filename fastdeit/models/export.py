"""`fastdeit export RUN --format hf|timm|safetensors --out DIR`: a trained student for the
tools its users live in.

hf:          a Hugging Face `transformers` folder: `DeiTForImageClassificationWithTeacher` for a
             distilled student; a plain one as `ViTForImageClassification`, as the Hub holds
             the official plain DeiTs (transformers' DeiT models always carry a distillation
             token, which would change a plain model's attention); `id2label` from the run's
             classes, and an image processor set to fastdeit's eval transform.
timm:        timm's folder format, by timm's own writer (`save_for_hf`), which
             `timm.create_model("local-dir:DIR", pretrained=True)` builds with its classes and
             eval settings.
safetensors: the state dict alone, timm's keys.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from fastdeit.config.schema import IMAGENET_MEAN, IMAGENET_STD
from fastdeit.errors import UserError
from fastdeit.models.factory import is_distilled, timm_name
from fastdeit.models.hf_keys import hf_state_dict
from fastdeit.runtime.atomic import write_failed
from fastdeit.training.evaluate import load_for_inference


def _vit_shape(model: nn.Module) -> dict[str, int]:
    block = model.blocks[0]
    return {"hidden_size": model.embed_dim, "num_hidden_layers": len(model.blocks),
            "num_attention_heads": block.attn.num_heads, "intermediate_size": block.mlp.fc1.out_features,
            "patch_size": model.patch_embed.patch_size[0]}


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


def _export_timm(model: nn.Module, classes: list[str], img_size: int, crop_pct: float, out: Path) -> None:
    """timm's own folder writer (config + safetensors), with the arguments the student was built
    with, its eval settings and class names."""
    from timm.models import save_for_hf

    args = {"img_size": img_size, "patch_size": model.patch_embed.patch_size[0], "embed_dim": model.embed_dim,
            "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads}
    data = {"input_size": (3, img_size, img_size), "crop_pct": crop_pct, "interpolation": "bicubic",
            "mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD)}
    try:
        save_for_hf(model, str(out), model_config={"label_names": classes}, model_args=args, data_config=data,
                    safe_serialization=True)
    except TypeError:  # an older timm: no model_args / data_config
        raise UserError("--format timm needs a newer timm (pip install -U timm)") from None


def export(ckpt: Path, fmt: str, out: Path, ema: bool = False) -> list[Path]:
    """Write the checkpoint's student in `fmt` into `out`; returns the files written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    loaded = load_for_inference(ckpt, None, use_ema=ema)
    model, name = loaded.model, timm_name(loaded.name)
    if not hasattr(model, "blocks") and fmt != "safetensors":
        raise UserError(f"--format {fmt} exports DeiT/ViT students; {name} is not one: use --format safetensors")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: pick a new folder")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    try:
        if fmt == "hf":
            _export_hf(model, loaded.classes, loaded.img_size, loaded.crop_pct, out)
        elif fmt == "timm":
            _export_timm(model, loaded.classes, loaded.img_size, loaded.crop_pct, out)
        else:
            save_file(state, str(out / "model.safetensors"), metadata={"architecture": name})
    except (OSError, SafetensorError) as e:  # a full disk: no half export is left to be read back
        for part in out.iterdir():
            if part.is_dir():
                shutil.rmtree(part)
            else:
                part.unlink()
        if made:
            out.rmdir()
        raise UserError(write_failed(out / "model.safetensors", e)) from None
    return sorted(p for p in out.iterdir() if p.is_file())
