"""Where the teacher's outputs come from. A TeacherSource maps (the student's input batch, its
plan) to the teacher's output for exactly those samples: logits [b, classes] (float32), or hard
labels [b] (int64). (The student's own labels, smoothed and mixed by the tail, are the batch's
`soft_labels`; "teacher" here always means the distillation teacher's outputs.)

- `live` is the paper's behaviour and the reference: the frozen teacher runs without
  gradients, in eval mode and the compute dtype, on the same mixed augmented batch.
- `replay` reads what `fastdeit cache-teacher --mode replay` stored for these (epoch,
  position) keys: the teacher's argmax, and its top-k logits for soft distillation.
- `labelmap` pools a cached per-image map of class probabilities over the plan's crop box
  (RoIAlign) and mixes the pooled distributions with the plan's λ, as ReLabel does.

Which of them a run uses, and how its cache is checked, is the registry's
(distill/targets.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from fastdeit.config.schema import DistillMode, TrainConfig
from fastdeit.data.plan import BatchPlan
from fastdeit.distill.cache_format import CacheReader, class_index_dtype
from fastdeit.errors import UserError
from fastdeit.models.factory import load_teacher, ready_teacher
from fastdeit.runtime.device import autocast, to_device

Inputs = dict[str, torch.Tensor]


class TeacherSource(Protocol):
    name: str
    live_check: LiveTeacher | None  # the live teacher a run measures this source's agreement with

    def inputs(self, plan: BatchPlan) -> dict[str, np.ndarray]:
        """What the source needs of the plan and its cache on the device, as host arrays
        (names prefixed with the source's name): Step.prepare copies them with the tail's in
        one transfer."""
        ...

    def __call__(self, images: torch.Tensor, plan: BatchPlan, inputs: Inputs | None = None) -> torch.Tensor:
        """Teacher logits [b, classes] (float32) or hard labels [b] for the batch's rows;
        `inputs`: `self.inputs(plan)` already on the device (else copied here)."""
        ...


def _on_device(source: TeacherSource, plan: BatchPlan, inputs: Inputs | None, device: torch.device) -> Inputs:
    return inputs if inputs is not None else to_device(source.inputs(plan), device)


class LiveTeacher:
    name = "live"
    live_check = None

    def __init__(self, teacher: nn.Module, amp_dtype: torch.dtype | None, img_size: int = 0) -> None:
        self.teacher = teacher
        self.amp_dtype = amp_dtype
        self.img_size = img_size  # the teacher's resolution; 0: the student's batch as it is

    def inputs(self, plan: BatchPlan) -> dict[str, np.ndarray]:
        return {}

    def __call__(self, images: torch.Tensor, plan: BatchPlan, inputs: Inputs | None = None) -> torch.Tensor:
        if self.img_size and images.shape[-1] != self.img_size:  # e.g. a 224 px teacher for a 384 px student
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bicubic", antialias=True,
                                   align_corners=False)
        if images.device.type == "cuda":  # the teacher's convolutions run channels_last (models.ready_teacher)
            images = images.contiguous(memory_format=torch.channels_last)
        # no_grad rather than inference_mode: the logits are saved by the loss's backward.
        with torch.no_grad(), autocast(images.device, self.amp_dtype):
            return self.teacher(images).float()


def load_live(cfg: TrainConfig, num_classes: int, device: torch.device, amp: torch.dtype | None,
              run: bool = True) -> LiveTeacher:
    """The run's teacher as every use builds it: loaded (models.load_teacher) and made ready on
    `device` (models.ready_teacher: the same teacher for a live run, a cache build and
    `--verify`). run=False: only loaded, on the CPU, for a source that just reads a cache and
    needs no more of the teacher than its name and weights' hash."""
    where = device if run else torch.device("cpu")
    teacher = load_teacher(cfg.distill, num_classes, cfg.data.img_size, where)
    check_input_size(teacher, cfg)
    if run:
        teacher = ready_teacher(teacher, device, cfg.run.compile)
    return LiveTeacher(teacher, amp, cfg.distill.teacher_img_size)


def check_input_size(teacher: nn.Module, cfg: TrainConfig) -> None:
    """A teacher built for one image size (a ViT: its position embedding fixes the grid) sees
    the size it was built for, or the run says in one line how to give it that size (it was a
    92-line AssertionError from inside timm at the first batch)."""
    built = getattr(getattr(teacher, "patch_embed", None), "img_size", None)
    strict = getattr(getattr(teacher, "patch_embed", None), "strict_img_size", False)
    sees = cfg.distill.teacher_img_size or cfg.data.img_size
    if strict and built is not None and tuple(built) != (sees, sees):
        size = int(built[0])
        raise UserError(f"the teacher takes {size} px images (its weights were trained at {size} px) and would see "
                        f"{sees} px ones: add --teacher-img-size {size} (the teacher then sees each batch resized "
                        f"to {size} px)")


def agreement(live: LiveTeacher, images: torch.Tensor, plan: BatchPlan, teacher: torch.Tensor) -> torch.Tensor:
    """[equal, total] (float64, on the device: reading it is left to the caller) of a source's
    hard labels for this batch against the live teacher's."""
    want = live(images, plan).argmax(1)
    got = teacher if teacher.dim() == 1 else teacher.argmax(1)
    total = torch.full((), float(len(want)), dtype=torch.float64, device=want.device)  # no host-to-device copy
    return torch.stack([(want == got).sum().double(), total])


def replay_dtype(topk: int, num_classes: int) -> np.dtype:
    """One row per (epoch, position): the teacher's argmax, its top-k logits (fp16) and their
    class indices, and the logsumexp of all logits (to rebuild probabilities)."""
    index = class_index_dtype(num_classes)
    return np.dtype([("label", "<i4"), ("idx", index, (topk,)), ("val", "<f2", (topk,)), ("lse", "<f4")])


def replay_records(logits: torch.Tensor, topk: int, dtype: np.dtype) -> np.ndarray:
    """What a replay cache stores of a batch of teacher logits."""
    logits = logits.float()
    val, idx = logits.topk(topk, dim=1)
    parts = {"label": logits.argmax(dim=1),  # argmax, not topk's first: ties resolve as live does
             "idx": idx, "val": val, "lse": torch.logsumexp(logits, dim=1)}
    # The four copies are queued together and waited for once (a .cpu() each waited four times).
    host = {name: part.to("cpu", non_blocking=True) for name, part in parts.items()}
    if logits.is_cuda:
        torch.cuda.current_stream(logits.device).synchronize()
    rec = np.empty(len(logits), dtype)
    for name, part in host.items():
        rec[name] = part.numpy()
    return rec


def topk_log_probs(idx: torch.Tensor, val: torch.Tensor, lse: torch.Tensor, num_classes: int,
                   tau: float) -> torch.Tensor:
    """Rebuild log-probabilities at temperature τ from top-k logits and the logsumexp: the
    top-k keep their probability, the remaining mass is spread evenly over the other classes,
    then p ** (1/τ) is renormalised (exact for τ = 1, an approximation otherwise)."""
    p_top = torch.exp(val.float() - lse.view(-1, 1))
    rest = (1.0 - p_top.sum(1, keepdim=True)).clamp_min(1e-12) / max(num_classes - idx.shape[1], 1)
    logp = torch.log(rest).expand(-1, num_classes).clone()
    logp.scatter_(1, idx.long(), torch.log(p_top.clamp_min(1e-12)))
    return torch.log_softmax(logp / tau, dim=1)


class ReplayTeacher:
    """The teacher's outputs read from a replay cache; rows are epoch * rows_per_epoch + position."""

    name = "replay"
    live_check = None

    def __init__(self, reader: CacheReader, rows_per_epoch: int, num_classes: int, mode: DistillMode,
                 tau: float) -> None:
        self.reader, self.rows_per_epoch = reader, rows_per_epoch
        self.num_classes = num_classes
        self.mode = mode
        self.tau = tau

    def inputs(self, plan: BatchPlan) -> dict[str, np.ndarray]:
        rec = self.reader.rows(plan.epoch * self.rows_per_epoch + plan.pos)
        if self.mode == "hard":
            return {"replay.label": rec["label"].astype(np.int64)}
        return {"replay.idx": rec["idx"].astype(np.int64), "replay.val": rec["val"].astype(np.float32),
                "replay.lse": rec["lse"].astype(np.float32)}

    def __call__(self, images: torch.Tensor, plan: BatchPlan, inputs: Inputs | None = None) -> torch.Tensor:
        d = _on_device(self, plan, inputs, images.device)
        if self.mode == "hard":
            return d["replay.label"]
        logp = topk_log_probs(d["replay.idx"], d["replay.val"], d["replay.lse"], self.num_classes, self.tau)
        return logp * self.tau  # the loss divides by τ again: log_softmax(logp) == logp


def labelmap_dtype(topk: int, num_classes: int, cells: int) -> np.dtype:
    """One row per image: top-k class scores (fp16) and indices at every cell of the map."""
    index = class_index_dtype(num_classes)
    return np.dtype([("idx", index, (cells, topk)), ("val", "<f2", (cells, topk))])


def labelmap_records(probs: torch.Tensor, topk: int, dtype: np.dtype) -> np.ndarray:
    """probs [b, classes, h, w] (softmax over classes at each cell) -> top-k per cell."""
    b, c, h, w = probs.shape
    val, idx = probs.permute(0, 2, 3, 1).reshape(b, h * w, c).topk(topk, dim=2)
    rec = np.empty(b, dtype)
    rec["idx"] = idx.cpu().numpy()
    rec["val"] = val.cpu().numpy()
    return rec


def pooling_inputs(rec: np.ndarray, crops: np.ndarray, sizes: np.ndarray, grid: int) -> dict[str, np.ndarray]:
    """The host side of `pooled`: each sample's crop box in cells of its map (RoIAlign's
    [batch index, x0, y0, x1, y1]), and its cache record as the bytes it is stored as (top-k
    classes, then their fp16 scores): widened on the device, so the host neither converts nor
    copies three times the bytes (at ImageNet's 7 x 7 maps, 1 MB a batch of 1,024 instead of 3)."""
    b = len(rec)
    w_src = np.maximum(sizes[:, 0], 1).astype(np.float32)
    h_src = np.maximum(sizes[:, 1], 1).astype(np.float32)
    left, top, cw, ch = (crops[:, k].astype(np.float32) for k in range(4))
    boxes = np.stack([np.zeros(b, np.float32), left / w_src * grid, top / h_src * grid,
                      (left + cw) / w_src * grid, (top + ch) / h_src * grid], axis=1)
    raw = np.ascontiguousarray(rec).view(np.uint8).reshape(b, rec.dtype.itemsize)
    return {"labelmap.boxes": boxes, "labelmap.rec": raw}


def record_fields(raw: torch.Tensor, grid: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A label map record's bytes [b, bytes] -> its classes (int64) and scores (float32), [b, cells, k]:
    the layout of `labelmap_dtype` (the class index type, then fp16, each cells x k)."""
    b = raw.shape[0]
    index = torch.int16 if class_index_dtype(num_classes) == "<i2" else torch.int32
    width = index.itemsize
    entries = raw.shape[1] // (width + 2)  # cells x k
    idx = raw[:, :entries * width].contiguous().view(index).long()
    val = raw[:, entries * width:].contiguous().view(torch.float16).float()
    return idx.view(b, grid * grid, -1), val.view(b, grid * grid, -1)


def pooled(inputs: Inputs, grid: int, num_classes: int) -> torch.Tensor:
    """RoIAlign of each sample's label map over its crop box: [b, classes] class distributions.

    The map covers the whole source image on a grid x grid lattice of cells; RoIAlign is
    linear, so pooling an identity map gives each cell's weight for the box, and the sparse
    top-k probabilities are scattered with those weights."""
    boxes = inputs["labelmap.boxes"]
    idx, val = record_fields(inputs["labelmap.rec"], grid, num_classes)  # [b, cells, k]
    b, device = len(boxes), boxes.device
    eye = torch.eye(grid * grid, device=device).view(1, grid * grid, grid, grid)
    weights = roi_align(eye, boxes, output_size=1, spatial_scale=1.0, sampling_ratio=2,
                        aligned=True).view(b, grid * grid)  # [b, cells]
    scores = torch.zeros(b, num_classes, device=device)
    scores.scatter_add_(1, idx.view(b, -1), (weights.unsqueeze(2) * val).view(b, -1))
    return scores / scores.sum(1, keepdim=True).clamp_min(1e-12)


def pooled_scores(rec: np.ndarray, crops: np.ndarray, sizes: np.ndarray, grid: int, num_classes: int,
                  device: torch.device) -> torch.Tensor:
    """`pooled` of cache rows and crop boxes given on the host."""
    return pooled(to_device(pooling_inputs(rec, crops, sizes, grid), device), grid, num_classes)


class LabelMapTeacher:
    """The teacher's outputs pooled from cached label maps over the plan's boxes, mixed with its λ."""

    name = "labelmap"
    live_check: LiveTeacher | None = None

    def __init__(self, reader: CacheReader, sizes: np.ndarray, grid: int, num_classes: int, mode: DistillMode,
                 tau: float) -> None:
        self.reader = reader
        self.sizes = sizes
        self.grid = grid
        self.num_classes = num_classes
        self.mode = mode
        self.tau = tau

    def inputs(self, plan: BatchPlan) -> dict[str, np.ndarray]:
        return {**pooling_inputs(self.reader.rows(plan.index), plan.crop, self.sizes[plan.index], self.grid),
                "labelmap.lam": plan.lam.astype(np.float32), "labelmap.partner": plan.partner.astype(np.int64)}

    def __call__(self, images: torch.Tensor, plan: BatchPlan, inputs: Inputs | None = None) -> torch.Tensor:
        d = _on_device(self, plan, inputs, images.device)
        scores = pooled(d, self.grid, self.num_classes)
        if (plan.lam < 1).any():
            lam = d["labelmap.lam"].view(-1, 1)
            scores = lam * scores + (1 - lam) * scores[d["labelmap.partner"]]
        if self.mode == "hard":
            return scores.argmax(dim=1)
        return torch.log(scores.clamp_min(1e-8)) * self.tau


def cell_probs(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities at every cell of a convnet's last feature map: the classifier
    applied position by position (its average over cells is the teacher's own logit)."""
    feats = teacher.forward_features(images)  # [b, features, h, w]
    fc = teacher.get_classifier()
    if feats.dim() != 4 or not isinstance(fc, nn.Linear):
        raise UserError("--targets labelmap needs a convnet teacher (timm forward_features giving [b, c, h, w] "
                        "and a linear classifier)")
    logits = torch.einsum("bfhw,kf->bkhw", feats.float(), fc.weight.float()) + fc.bias.float().view(1, -1, 1, 1)
    return logits.softmax(dim=1)  # [b, classes, h, w]
