"""`fastdeit eval`: a checkpoint's top-1 / top-5 on a val split."""

from __future__ import annotations

from pathlib import Path

import torch

from fastdeit.config import DataConfig, ModelConfig
from fastdeit.data.folder import load_dataset
from fastdeit.engine import EvalResult, amp_dtype, evaluate, resolve_device
from fastdeit.errors import UserError
from fastdeit.loaders import Loaders, choose_loader
from fastdeit.models import build_model, read_checkpoint


def evaluate_checkpoint(ckpt: Path, data: Path, device: str = "auto", batch_size: int = 256,
                        workers: int = 2, use_ema: bool = False, loader: str = "auto") -> EvalResult:
    """Top-1/top-5 of a fastdeit checkpoint on the val split of `data`, with the checkpoint's
    own image size and crop."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    weights, meta = read_checkpoint(ckpt)
    if not meta:
        raise UserError(f"{ckpt} is not a fastdeit checkpoint (no meta): "
                        f"fine-tune from it with --set model.init={ckpt}")
    if use_ema:
        weights = _ema_weights(ckpt)
    _, val = load_dataset(data)
    if list(val.classes) != meta["classes"]:
        raise UserError(f"{data} has classes {list(val.classes)[:5]}..., the checkpoint was trained on "
                        f"{meta['classes'][:5]}...")
    dev = resolve_device(device)
    model_cfg = ModelConfig(**meta["model"], drop_path=0.0)
    model = build_model(model_cfg, meta["num_classes"], meta["img_size"])
    model.load_state_dict(weights)
    data_cfg = DataConfig(img_size=meta["img_size"], crop_pct=meta["crop_pct"], workers=workers,
                          eval_batch_size=batch_size)
    kind, _ = choose_loader(loader, dev)
    batches = Loaders(kind, data_cfg, None, dev).eval(val)
    return evaluate(model.to(dev), batches, dev, amp_dtype("auto", dev))


def _ema_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    ema = torch.load(ckpt, map_location="cpu", weights_only=True).get("ema") or {}
    if not ema:
        raise UserError(f"{ckpt} holds no EMA weights (train with --set model.ema=true)")
    return {k.removeprefix("module."): v for k, v in ema.items()}
