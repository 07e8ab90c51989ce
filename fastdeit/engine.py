"""train_step and evaluate: pure compute on tensors already on the device. No I/O."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from fastdeit.distill import DistillationLoss
from fastdeit.errors import UserError
from fastdeit.models import head_logits
from fastdeit.pipelines.tail import normalize


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


@dataclass
class Stepper:
    """What one optimisation step needs; built once by the trainer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: DistillationLoss
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float = 0.0
    ema: nn.Module | None = None

    def step(self, images: torch.Tensor, targets: torch.Tensor,
             teacher: torch.Tensor | None, num_updates: int) -> dict[str, torch.Tensor]:
        """Forward, loss, backward, optimizer (and EMA) step. Returns the loss parts as
        detached device tensors: reading them (a sync) is left to the caller's log cadence."""
        self.model.train()
        with autocast(images.device, self.amp_dtype):
            outputs = self.model(images)
        loss, parts = self.loss_fn(outputs, targets, teacher)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(getattr(self.model, "module", self.model), step=num_updates)  # DDP's inner model
        return {"loss": loss.detach(), **parts}


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
             amp_dtype: torch.dtype | None = None) -> EvalResult:
    """Top-1/top-5 of every head over (uint8 images, labels, ok) batches; rows whose file
    failed to decode (ok False) are left out and counted in `bad`."""
    model.eval()
    n, bad = 0, 0
    c1: dict[str, float] = {}
    c5: dict[str, float] = {}
    start = time.perf_counter()
    for images, labels, ok in batches:
        keep = ok.bool()
        bad += int((~keep).sum())
        images, labels = images[keep].to(device, non_blocking=True), labels[keep].to(device)
        if len(labels) == 0:
            continue
        with autocast(device, amp_dtype):
            logits = head_logits(model, normalize(images))
        for head, out in logits.items():
            k = min(5, out.shape[1])
            top = out.float().topk(k, dim=1).indices
            hit = top == labels.view(-1, 1)
            c1[head] = c1.get(head, 0.0) + float(hit[:, 0].sum())
            c5[head] = c5.get(head, 0.0) + float(hit.any(dim=1).sum())
        n += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EvalResult(n=n, correct1=c1, correct5=c5, bad=bad, seconds=time.perf_counter() - start)
