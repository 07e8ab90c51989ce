"""Where distillation targets come from. A TargetSource maps (the student's input batch, its
plan) to the teacher's output for exactly those samples.

`live` is the paper's behaviour and the reference: the frozen teacher runs without
gradients, in eval mode and the compute dtype, on the same mixed augmented batch as the
student.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol

import torch
from torch import nn

from fastdeit.plan import BatchPlan


class TargetSource(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        """Teacher logits [b, classes] (float32) or hard labels [b] for the batch's rows."""
        ...


class LiveTeacher:
    name = "live"

    def __init__(self, teacher: nn.Module, amp_dtype: torch.dtype | None) -> None:
        self.teacher = teacher
        self.amp_dtype = amp_dtype

    def __call__(self, images: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        # no_grad rather than inference_mode: the logits are saved by the loss's backward.
        amp = (torch.autocast(images.device.type, dtype=self.amp_dtype)
               if self.amp_dtype is not None else nullcontext())
        with torch.no_grad(), amp:
            return self.teacher(images).float()
