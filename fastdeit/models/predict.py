"""`fastdeit predict IMAGE... --weights RUN|FILE`: the top classes of each image, per head,
preprocessed exactly as evaluation does (shorter side to img_size / crop_pct, centre crop)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fastdeit.data.folder import IMG_EXTENSIONS, ImageIndex
from fastdeit.errors import UserError
from fastdeit.models.factory import head_logits
from fastdeit.pipelines.reference import eval_loader
from fastdeit.pipelines.tail import normalize
from fastdeit.runtime.device import resolve_device
from fastdeit.training.evaluate import Architecture, load_for_inference
from fastdeit.training.rundir import weights_of


def image_files(inputs: list[Path]) -> list[Path]:
    """The images named, and those under the folders named (sorted), in the order given."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
            if not found:
                raise UserError(f"{item} holds no images ({', '.join(IMG_EXTENSIONS)})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item} does not exist")
    return files


def predict(inputs: list[Path], weights: Path, arch: Architecture, head: str, topk: int, device: str,
            batch_size: int = 32) -> Iterator[dict]:
    """One record per image: its path and [class, probability] pairs of the top `topk` of
    `head`, or the reason it could not be read."""
    loaded = load_for_inference(weights_of(weights), arch)
    dev = resolve_device(device)
    model = loaded.model.to(dev)
    files = image_files(inputs)
    # Absolute paths under "/": the evaluation loader reads them as an index's rows.
    index = ImageIndex(root=Path("/"), classes=tuple(loaded.classes), paths=tuple(str(p.resolve()) for p in files),
                       labels=np.zeros(len(files), np.int64), sizes=np.zeros((len(files), 2), np.int32),
                       nbytes=np.zeros(len(files), np.int64))
    at = 0
    with torch.no_grad():
        for images, _labels, ok in eval_loader(index, loaded.img_size, loaded.crop_pct, batch_size, 0):
            heads = head_logits(model, normalize(images.to(dev)))
            if head not in heads:
                raise UserError(f"--head {head}: this model has only the joint head (not distilled)")
            probs = heads[head].float().softmax(-1).cpu()  # [b, classes]
            top = probs.topk(min(topk, probs.shape[1]), dim=1)
            for k in range(len(images)):
                record = {"image": str(files[at + k]), "head": head}
                if ok[k]:
                    record["top"] = [[loaded.classes[int(c)], round(float(p), 4)]
                                     for p, c in zip(top.values[k], top.indices[k])]
                else:
                    record["error"] = "cannot be read as an image"
                yield record
            at += len(images)
