"""The batch contract both training pipelines keep (pipelines/reference.py, pipelines/dali/).

A pipeline executes a BatchPlan and hands over a `LoadedBatch`: uint8 [b, 3, S, S] images,
int64 labels, the plan, and the files that could not be decoded (or, where the loader ran the
batch tail itself, as a CPU run's workers do, the tail's output: see `LoadedBatch`). Shapes stay static when a
file is unreadable: its row takes the inputs and label of another row of the same batch, by
the one rule in `substitutes`, so the reference and DALI replace the same rows alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from fastdeit.config.schema import IMAGENET_MEAN
from fastdeit.data.folder import ImageIndex
from fastdeit.data.plan import BatchPlan

# What geometric ops fill uncovered pixels with: timm's mean pixel (transforms_factory), uint8.
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)


@dataclass
class LoadedBatch:
    """A decoded batch: uint8 [b, 3, S, S] images, int64 labels, the plan it executes, and the
    files that failed to decode (their rows hold a copy of another sample of the batch). Where
    the loader ran the tail (pipelines/tail.TailSpec), `soft_labels` is set and `images` are the
    tail's output, the student's input in the compute dtype."""

    images: torch.Tensor
    labels: torch.Tensor
    plan: BatchPlan
    bad: tuple[str, ...]
    soft_labels: torch.Tensor | None = None  # [b, classes] float32, where the tail has run

    def pin_memory(self) -> LoadedBatch:
        """A copy in pinned memory (DataLoader calls it with pin_memory=True): the step's
        copy to the GPU is then asynchronous."""
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())

    @classmethod
    def of(cls, images: torch.Tensor, index: ImageIndex, plan: BatchPlan, bad: np.ndarray) -> LoadedBatch:
        """The batch of `plan` whose rows `bad` were substituted (`images` already hold the
        substitutes): labels follow the same rule, the bad rows' files are named."""
        labels = index.labels[plan.index[substitutes(plan, bad, index)]]
        return cls(images=images, labels=torch.from_numpy(labels), plan=plan,
                   bad=tuple(index.paths[i] for i in plan.index[bad]))


def substitutes(plan: BatchPlan, bad: np.ndarray, index: ImageIndex) -> np.ndarray:
    """Row -> the row whose inputs it takes: itself, or for a bad row the nearest good row
    before it (after it, for the first rows). A batch with no good row cannot be filled."""
    take = np.arange(len(plan))
    good = np.flatnonzero(~bad)
    if len(good) == 0:
        raise RuntimeError(f"every image of batch (epoch {plan.epoch}, step {plan.step}) failed to decode, "
                           f"e.g. {index.paths[plan.index[0]]}")
    for i in np.flatnonzero(bad):
        before = good[good < i]
        take[i] = before[-1] if len(before) else good[0]
    return take
