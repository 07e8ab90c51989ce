"""Saved model folders read back as weights: a Hugging Face transformers ViT / DeiT folder and
timm's folder format (what `fastdeit export --format hf|timm` writes, and what the Hub holds),
with what their config says of the model, so that they load without `--model`.

The meta has a fastdeit checkpoint's shape (`training/rundir.checkpoint_meta`: the model's name and
size, image size, classes, crop) plus `folder` (which kind it came from): the architecture is
the folder's, and a `--model` given with it may name the family (`vit_base_patch16_224` for a
plain ViT folder) but never another shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from fastdeit.errors import UserError

_DEIT_SIZES = {192: "tiny", 384: "small", 768: "base"}  # embed dim -> DeiT size, for the model's name
DEFAULT_CROP = 0.875


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def read_model_folder(path: Path, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(timm-keyed weights, meta) of a saved model folder whose config.json is `config`."""
    if config.get("model_type", "vit") not in ("deit", "vit"):
        raise UserError(f"{path} holds a transformers {config['model_type']!r} model: fastdeit reads ViT and DeiT "
                        f"folders")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no .safetensors weights (save it with safe_serialization=True)")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_safetensors(f))
    try:
        if "model_type" in config:
            return _transformers(path, config, weights)
        return weights, _timm_meta(config, weights)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:  # a config of other shapes
        raise UserError(f"{path} is not a ViT / DeiT image classifier folder fastdeit can read ({e!r})") from None


def _transformers(path: Path, config: dict[str, Any], hf: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from fastdeit.models.hf_keys import timm_state_dict

    sd = timm_state_dict(hf)
    dim, img = int(config["hidden_size"]), int(config.get("image_size", 224))
    model = {"name": f"deit_{_DEIT_SIZES.get(dim, 'small')}{'_distilled' if 'dist_token' in sd else ''}",
             "patch_size": int(config.get("patch_size", 16)), "depth": int(config["num_hidden_layers"]),
             "embed_dim": dim, "num_heads": int(config["num_attention_heads"])}
    labels = config.get("id2label") or {}
    size = _processor(path).get("size")  # the eval resize, {"shortest_edge": int(img / crop_pct)}
    edge = size.get("shortest_edge") if isinstance(size, dict) else None
    crop = img / (edge + 1e-6) if isinstance(edge, int) and edge > 0 else DEFAULT_CROP  # int() gives edge back
    return sd, _meta(model, img, sd, [labels.get(str(i)) for i in range(len(labels))], crop, "transformers")


def _timm_meta(config: dict[str, Any], sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    args, pre = config.get("model_args") or {}, config.get("pretrained_cfg") or {}
    img = args.get("img_size") or pre.get("input_size", [3, 224, 224])[-1]
    model = {"name": config["architecture"],
             **{k: int(args[k]) for k in ("patch_size", "depth", "embed_dim", "num_heads") if k in args}}
    return _meta(model, int(img[-1] if isinstance(img, list | tuple) else img), sd,
                 list(config.get("label_names") or []), float(pre.get("crop_pct", DEFAULT_CROP)), "timm")


def _meta(model: dict[str, Any], img: int, sd: dict[str, torch.Tensor], labels: list[Any], crop: float,
          folder: str) -> dict[str, Any]:
    """The folder's meta; `notes`: where its config and its weights disagree (an edited config),
    said once when the folder is loaded (evaluation.load_for_inference)."""
    classes = int(sd["head.weight"].shape[0])
    notes = []
    named = len(labels) == classes and None not in labels
    names = [str(c) for c in labels] if named else [f"class {i}" for i in range(classes)]
    if not named:
        notes.append(f"its config names {len(labels) - labels.count(None)} classes, its head has {classes}: the "
                     f"classes are shown as 'class N' and not checked against the data's")
    trained = _trained_size(model, sd)
    if trained and trained != img:
        notes.append(f"its config says image size {img}, its weights were trained at {trained} px: it runs at "
                     f"{img} px with the position embedding resampled (accuracy is usually lower)")
    return {"model": model, "img_size": img, "num_classes": classes, "classes": names, "crop_pct": crop,
            "dataset": None, "folder": folder, "notes": notes, "named": named}


def _trained_size(model: dict[str, Any], sd: dict[str, torch.Tensor]) -> int | None:
    """The image size the weights' position embedding was made for (a square grid of patches
    after the class and distillation tokens), or None where it cannot tell."""
    pos, patch = sd.get("pos_embed"), model.get("patch_size")
    if pos is None or pos.dim() != 3 or not patch:
        return None
    cells = pos.shape[1] - 1 - ("dist_token" in sd)
    grid = math.isqrt(max(cells, 0))
    return grid * int(patch) if grid * grid == cells else None


def _processor(path: Path) -> dict[str, Any]:
    try:
        found = json.loads((path / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
