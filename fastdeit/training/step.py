"""One training step, composed in one place: prepare a loaded batch, then update the student.

    LoadedBatch (uint8 images, labels, plan; from either loader)
      -> Step.prepare: to the device; the tail (normalize, erasing, mixup/cutmix, smoothed
         soft labels, cast to the compute dtype); the teacher's outputs for this plan
      -> Prepared
      -> Step.update: forward under autocast, DistillationLoss, backward, optimizer step
         (with the grad scaler, clipping and EMA where the run has them)

Training (training/trainer.py), `fastdeit cache-teacher` (its replay build and `--verify`) and the
throughput and loader benchmarks all call this one object, built by `build.make_step`, so what
a benchmark measures is what training runs. No I/O here, and no host sync in `update`: the
loss parts come back as device tensors, read at the caller's logging cadence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from timm.utils import ModelEmaV3
from torch import nn

from fastdeit.config.schema import TrainConfig
from fastdeit.data.plan import BatchPlan
from fastdeit.distill.loss import DistillationLoss
from fastdeit.distill.sources import TeacherSource
from fastdeit.pipelines.batch import LoadedBatch
from fastdeit.pipelines.tail import TailOutput, TailSpec, apply_tail, tail_inputs
from fastdeit.runtime.device import autocast, to_device
from fastdeit.runtime.distributed import step_seed


@dataclass
class Prepared:
    """A batch ready for the student: what `update` consumes."""

    images: torch.Tensor  # [b, 3, S, S] in the compute dtype: normalized, erased, mixed
    soft_labels: torch.Tensor  # [b, classes] float32: smoothed one-hot labels mixed with the plan's λ
    teacher: torch.Tensor | None  # the teacher's logits [b, classes] or hard labels [b]; None without a teacher
    plan: BatchPlan | None  # None for random inputs (the model benchmarks feed `update` directly)
    bad: tuple[str, ...]  # files that failed to decode (their rows copy another sample)


@dataclass
class Step:
    """A run's step. Without `model` it only prepares (cache building, verifying, the loader benchmark)."""

    device: torch.device
    amp: torch.dtype | None  # the autocast dtype; None for plain fp32
    num_classes: int
    smoothing: float
    teacher: TeacherSource | None = None
    model: nn.Module | None = None  # what is trained: the student, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer | None = None
    loss: DistillationLoss | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    clip_grad: float = 0.0
    ema: ModelEmaV3 | None = None
    # (seed, rank) when the student draws random masks (drop path, dropout): the torch RNG is
    # seeded per update, so a resumed run draws what an uninterrupted one would have drawn.
    reseed: tuple[int, int] | None = None
    accum: int = 1  # micro-batches per update (run.accum_steps)

    def prepare(self, batch: LoadedBatch) -> Prepared:
        """Device transfer, the tail and the teacher's outputs for the batch's plan. What the
        tail and the teacher need of the plan and the cache crosses to the device as one
        buffer, in one asynchronous copy; nothing here waits for the device. A batch whose
        loader ran the tail (`soft_labels` set: a CPU run's workers) goes on as it is."""
        tailed = batch.soft_labels is not None
        host = {} if tailed else tail_inputs(batch.plan, batch.labels.numpy())
        if self.teacher is not None:
            host.update(self.teacher.inputs(batch.plan))
        inputs = to_device(host, self.device)
        x = batch.images.to(self.device, non_blocking=True)
        if tailed:
            tail = TailOutput(images=x, soft_labels=batch.soft_labels.to(self.device, non_blocking=True))
        else:
            tail = apply_tail(x, batch.labels, batch.plan, self.num_classes, self.smoothing,
                              self.amp or torch.float32, inputs)
        teacher = self.teacher(tail.images, batch.plan, inputs) if self.teacher is not None else None
        return Prepared(tail.images, tail.soft_labels, teacher, batch.plan, batch.bad)

    @property
    def tail(self) -> TailSpec:
        """This step's tail, for a loader to run where it makes the batch (Step.prepare then
        takes the batch as it is)."""
        return TailSpec(self.num_classes, self.smoothing, self.amp or torch.float32)

    def update(self, batch: Prepared, number: int) -> dict[str, torch.Tensor]:
        """Forward, loss, backward, optimizer (and EMA) step: the run's update `number`
        (1-based). With `accum` K > 1 the batch goes through forward and backward as K equal
        micro-batches whose losses are each 1/K of theirs, so the gradients sum to the whole
        batch's (every loss term is a mean over rows), and DDP all-reduces on the last one only.
        Returns the loss parts as detached device tensors (reading them is a sync)."""
        if self.model is None or self.optimizer is None or self.loss is None:
            raise RuntimeError("this Step only prepares batches (it was built without a model)")
        if self.reseed is not None:
            torch.manual_seed(step_seed(*self.reseed, number - 1))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total: dict[str, torch.Tensor] = {}
        for k, part in enumerate(self.micro_batches(batch)):
            last = k == self.accum - 1
            # DDP's no_sync: gradients stay local until the last micro-batch's backward.
            with contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
                with autocast(self.device, self.amp):
                    outputs = self.model(part.images)
                loss, parts = self.loss(outputs, part.soft_labels, part.teacher)
                loss = loss / self.accum if self.accum > 1 else loss
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for name, value in {"loss": loss.detach(), **parts}.items():
                value = value if name == "loss" or self.accum == 1 else value / self.accum
                total[name] = total[name] + value if name in total else value
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(getattr(self.model, "module", self.model), step=number)  # DDP's inner model
        return total

    def micro_batches(self, batch: Prepared) -> list[Prepared]:
        """The batch as `accum` equal slices of rows (after the tail: mixing is already done)."""
        if self.accum == 1:
            return [batch]
        k = self.accum
        cut = [t.chunk(k) if t is not None else (None,) * k for t in (batch.images, batch.soft_labels, batch.teacher)]
        return [Prepared(x, y, t, batch.plan, batch.bad) for x, y, t in zip(*cut)]

    def __call__(self, batch: LoadedBatch, number: int) -> tuple[Prepared, dict[str, torch.Tensor]]:
        prepared = self.prepare(batch)
        return prepared, self.update(prepared, number)


def make_step(cfg: TrainConfig, device: torch.device, amp: torch.dtype | None, num_classes: int,
              teacher: TeacherSource | None = None, *, model: nn.Module | None = None,
              optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None,
              ema: ModelEmaV3 | None = None, rank: int = 0) -> Step:
    """The step of a run with config `cfg`: the tail's smoothing, the distillation loss and
    clipping from the config; `model` and its `optimizer` (and scaler, EMA) where the caller
    trains, nothing of them where it only prepares batches."""
    stochastic = model is not None and any(
        getattr(m, "drop_prob", 0) > 0 or (isinstance(m, nn.Dropout) and m.p > 0) for m in model.modules())
    d = cfg.distill
    loss = DistillationLoss(d.mode, d.alpha, d.tau, d.base_loss)
    return Step(device=device, amp=amp, num_classes=num_classes, smoothing=cfg.aug.smoothing, teacher=teacher,
                model=model, optimizer=optimizer, loss=loss, scaler=scaler,
                clip_grad=cfg.optim.clip_grad, ema=ema, reseed=(cfg.run.seed, rank) if stochastic else None,
                accum=cfg.run.accum_steps)
