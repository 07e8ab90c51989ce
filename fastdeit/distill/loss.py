"""DeiT's distillation loss, with the paper's (and the official code's) semantics.

total = (1 - α) · base + α · distill, where base is the soft-target cross-entropy of the class
head against the mixed, smoothed labels (or, `bce`, DeiT III's binary cross-entropy against
those labels made 0/1: every class with a share > 0 is a positive, as the official engine's
`targets.gt(0.0)`), and distill is, on the distillation head:
  soft: KL(log_softmax(s/τ) ‖ log_softmax(t/τ)), summed, × τ² / numel(s)
  hard: cross-entropy against the teacher's argmax, without smoothing.
With `none` only the base loss is used (a distilled student then trains its class head only,
as in the official code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from fastdeit.config.schema import BaseLoss, DistillMode, check_choice


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DeiT III's base loss: BCE with logits, mean over rows and classes, against the targets
    made 0/1 (a class whose mixed share is > 0 is a positive)."""
    return F.binary_cross_entropy_with_logits(logits, targets.gt(0.0).to(logits.dtype))


class DistillationLoss(nn.Module):
    def __init__(self, mode: DistillMode = "none", alpha: float = 0.5, tau: float = 1.0,
                 base: BaseLoss = "ce") -> None:
        super().__init__()
        check_choice("distill.mode", mode, DistillMode)
        check_choice("distill.base_loss", base, BaseLoss)
        self.mode = mode
        self.alpha = alpha
        self.tau = tau
        self.base = SoftTargetCrossEntropy() if base == "ce" else binary_cross_entropy

    def forward(
        self,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        targets: torch.Tensor,
        teacher: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """outputs: logits, or (cls_logits, dist_logits) of a distilled student in training;
        targets: [b, classes] soft labels; teacher: the teacher's logits [b, classes] (for
        `hard`, integer labels [b] are accepted too). Returns (loss, parts)."""
        if isinstance(outputs, torch.Tensor):
            cls, dist = outputs, None
        else:
            cls, dist = outputs
        base = self.base(cls.float(), targets)
        if self.mode == "none":
            return base, {"loss_base": base.detach()}
        if dist is None:
            raise ValueError("distillation needs a student with a distillation token (a *_distilled model)")
        if teacher is None:
            raise ValueError(f"distillation mode {self.mode!r} needs teacher outputs")
        dist = dist.float()
        if self.mode == "soft":
            t = self.tau
            kd = F.kl_div(F.log_softmax(dist / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                          reduction="sum", log_target=True) * (t * t) / dist.numel()
        else:
            labels = teacher if teacher.dim() == 1 else teacher.argmax(dim=1)
            kd = F.cross_entropy(dist, labels)
        loss = base * (1 - self.alpha) + kd * self.alpha
        return loss, {"loss_base": base.detach(), "loss_distill": kd.detach()}
