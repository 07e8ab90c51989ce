"""Evaluation: top-1 / top-5 of every head over val batches, and `fastdeit eval` of a checkpoint."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fastdeit.config.schema import DataConfig, Device, Loader, ModelConfig, check_choice
from fastdeit.data.folder import load_dataset
from fastdeit.data.loaders import Loaders, choose_loader
from fastdeit.errors import UserError
from fastdeit.models.factory import build_model, fit_state_dict, head_classes, head_logits, named_model
from fastdeit.pipelines.tail import normalize
from fastdeit.runtime.device import amp_dtype, autocast, resolve_device, sync
from fastdeit.training.rundir import model_config_of, read_ema_weights, read_weights


@dataclass
class EvalResult:
    """Counts of correct predictions per head; percentages are derived."""

    n: int
    correct1: dict[str, float]
    correct5: dict[str, float]
    bad: int
    seconds: float

    def top1(self, head: str = "joint") -> float:
        return 100.0 * self.correct1[head] / max(self.n, 1)

    def top5(self, head: str = "joint") -> float:
        return 100.0 * self.correct5[head] / max(self.n, 1)

    @property
    def heads(self) -> list[str]:
        return list(self.correct1)

    @property
    def img_s(self) -> float:
        return self.n / max(self.seconds, 1e-9)

    def summed(self, heads: list[str], reduce: Callable[[torch.Tensor], torch.Tensor]) -> EvalResult:
        """The counts summed over ranks by `reduce` (an all-reduce; every rank passes the same
        heads, including a rank that evaluated nothing). Counts are whole numbers held in
        float64, so the sum is exact."""
        counts = torch.tensor([self.n, self.bad, *(self.correct1.get(h, 0.0) for h in heads),
                               *(self.correct5.get(h, 0.0) for h in heads)], dtype=torch.float64)
        c, k = reduce(counts).tolist(), len(heads)
        return EvalResult(n=int(c[0]), correct1=dict(zip(heads, c[2:2 + k])), correct5=dict(zip(heads, c[2 + k:])),
                          bad=int(c[1]), seconds=self.seconds)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device,
             amp_dtype: torch.dtype | None = None, progress: Callable[[int], None] | None = None) -> EvalResult:
    """Top-1/top-5 of every head over (uint8 images, labels, ok) batches; rows whose file
    failed to decode (ok False) are left out and counted in `bad`."""
    model.eval()
    n, bad = 0, 0
    hits: dict[str, torch.Tensor] = {}  # head -> [top-1, top-5] correct, float64 on the device: read once at the end
    start = time.perf_counter()
    for images, labels, ok in batches:
        keep = ok.bool()  # on the host
        kept = int(keep.sum())
        bad += len(keep) - kept
        if kept == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if kept < len(keep):  # rare: unreadable files in this batch
            rows = keep.nonzero().view(-1).to(device)
            images, labels = images[rows], labels[rows]
        with autocast(device, amp_dtype):
            logits = head_logits(model, normalize(images))
        for head, out in logits.items():
            top = out.float().topk(min(5, out.shape[1]), dim=1).indices
            hit = top == labels.view(-1, 1)
            counts = torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]).double()
            hits[head] = hits[head] + counts if head in hits else counts
        n += kept
        if progress is not None:
            progress(len(keep))
    read = {head: c.tolist() for head, c in hits.items()}  # the one wait for the device
    sync(device)
    return EvalResult(n=n, correct1={h: c[0] for h, c in read.items()}, correct5={h: c[1] for h, c in read.items()},
                      bad=bad, seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class Architecture:
    """What `fastdeit eval` needs to build a model for weights that do not describe it
    (official or timm files): `name` (required then), image and patch size, crop."""

    name: str = ""
    img_size: int = 224
    patch_size: int = 16
    crop_pct: float = 0.875


@dataclass(frozen=True)
class Loaded:
    """A model ready for inference, with what its inputs and outputs mean."""

    model: nn.Module
    classes: list[str]  # class names where the weights record them, else "class N"
    img_size: int
    crop_pct: float
    named: bool = True  # the classes are the names the model was trained on
    name: str = ""  # the model's name (config.ModelConfig.name)


def check_finite(weights: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Refuse weights holding NaN or inf: a diverged state scores as chance and predicts NaN
    (not JSON), which would pass for a result."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{ckpt}: its weights are not finite (NaN or inf in {bad[0]}"
                        f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): a diverged state; use the "
                        f"run's checkpoint-last.pt (the last good state) or checkpoint-best.pt")


def _note_on_stderr(text: str) -> None:
    sys.stderr.write(f"note: {text}\n")


def load_for_inference(ckpt: Path, arch: Architecture | None, num_classes: int | None = None,
                       use_ema: bool = False, note: Callable[[str], None] = _note_on_stderr) -> Loaded:
    """A fastdeit checkpoint as it was trained (its model, classes, image size and crop), or
    weights from elsewhere (official DeiT, timm, safetensors) built as `arch` describes, with
    `num_classes` outputs (default: the file's head). Where a saved folder's config and its
    weights disagree (an edited config), `note` is told, a line each."""
    weights, meta = read_weights(ckpt)
    for text in meta.get("notes", ()):
        note(f"{ckpt}: {text}")
    folder = meta.get("folder")  # a saved transformers / timm folder: its config names the shape
    if use_ema and folder:
        raise UserError(f"--ema: {ckpt} is a saved {folder} folder and holds no EMA weights")
    if meta and use_ema:
        weights = read_ema_weights(ckpt)
    check_finite(weights, ckpt)
    if meta:
        name = named_model(meta, arch.name if arch else "", ckpt, "--model")
        model = build_model(model_config_of(meta, drop_path=0.0, name=name), meta["num_classes"], meta["img_size"])
        if folder:  # built by its config's shape: what does not fit is one line
            fit_state_dict(weights, model, str(ckpt), new_head_ok=False)
        else:
            model.load_state_dict(weights)
        return Loaded(model.eval(), list(meta["classes"]), meta["img_size"], meta["crop_pct"],
                      named=meta.get("named", True), name=name)
    if arch is None or not arch.name:
        raise UserError(f"{ckpt} is not a fastdeit checkpoint and does not name its model: pass --model NAME "
                        f"(e.g. deit_small_distilled)")
    if use_ema:
        raise UserError(f"--ema: {ckpt} is not a fastdeit checkpoint and holds no EMA weights")
    n = num_classes or head_classes(weights) or 1000
    model = build_model(ModelConfig(name=arch.name, patch_size=arch.patch_size), n, arch.img_size)
    fit_state_dict(weights, model, str(ckpt), new_head_ok=False)
    return Loaded(model.eval(), [f"class {i}" for i in range(n)], arch.img_size, arch.crop_pct, named=False,
                  name=arch.name)


def check_eval_args(device: str, batch_size: int, workers: int, loader: str) -> None:
    """The checks of eval's arguments (named as its flags), before any weights are fetched."""
    check_choice("--device", device, Device)
    check_choice("--loader", loader, Loader)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0: load in this process), got {workers}")


def evaluate_checkpoint(ckpt: Path, data: Path, device: str = "auto", batch_size: int = 256,
                        workers: int = 2, use_ema: bool = False, loader: Loader = "auto",
                        cache_dir: Path | None = None, arch: Architecture | None = None,
                        progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Top-1/top-5 on the val split of `data` of what `load_for_inference` loads;
    `progress(done, total)` after each batch. Its callers check the arguments first
    (`check_eval_args`), before any weights are fetched."""
    _, val = load_dataset(data, cache_dir=cache_dir)
    loaded = load_for_inference(ckpt, arch, len(val.classes), use_ema)
    if loaded.named and loaded.classes != list(val.classes):
        raise UserError(f"{data} has classes {list(val.classes)[:5]}..., the checkpoint was trained on "
                        f"{loaded.classes[:5]}...")
    dev = resolve_device(device)
    data_cfg = replace(DataConfig(), img_size=loaded.img_size, crop_pct=loaded.crop_pct, workers=workers,
                       eval_batch_size=batch_size)
    kind, _ = choose_loader(loader, dev)
    batches = Loaders(kind, data_cfg, None, dev).eval(val)
    done = [0]

    def advance(images: int) -> None:
        done[0] += images
        if progress is not None:
            progress(done[0], len(val))

    return evaluate(loaded.model.to(dev), batches, dev, amp_dtype("auto", dev), advance)
