"""Teacher caches for a run: build them (`fastdeit cache-teacher`), verify them, open them.

replay:   the teacher runs once over exactly the augmented, mixed views the plan produces for
          epochs 0..E-1 (same pipeline, same tail, same LiveTeacher as a live run) and its
          argmax, top-k logits and logsumexp are stored per (epoch, position).
labelmap: the teacher runs once per image on the whole image; the class probabilities at
          every cell of its last feature map are stored (top-k per cell).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from fastdeit.config import TrainConfig
from fastdeit.data.folder import ImageIndex
from fastdeit.dist import SINGLE, World
from fastdeit.engine import amp_dtype, autocast, resolve_device
from fastdeit.errors import UserError
from fastdeit.loaders import Loaders, choose_loader
from fastdeit.models import load_teacher
from fastdeit.pipelines.tail import apply_tail, normalize
from fastdeit.pipelines.torch import square_loader
from fastdeit.plan import PlanSpec, steps_per_epoch
from fastdeit.targets import (
    LabelMapTargets,
    LiveTeacher,
    ReplayTargets,
    TargetSource,
    labelmap_records,
    replay_records,
)
from fastdeit.teacher_cache import (
    FORMAT,
    CacheReader,
    CacheWriter,
    dtype_text,
    labelmap_dtype,
    replay_dtype,
    weights_sha256,
)

SHARD_ROWS = 1 << 16  # rows per shard, rounded down to whole global batches


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[img_s]} img/s"), TimeRemainingColumn(), console=console)


def identity(cfg: TrainConfig, mode: str, index: ImageIndex, teacher: nn.Module) -> dict[str, Any]:
    """What a cache's rows mean; a run and its cache must agree on every key."""
    d = cfg.distill
    name = d.teacher or getattr(teacher, "fastdeit_name", type(teacher).__name__)
    out = {"format": FORMAT, "mode": mode, "teacher": name, "teacher_sha256": weights_sha256(teacher.state_dict()),
           "dataset": index.fingerprint(), "num_classes": len(index.classes)}
    if mode == "replay":
        out["plan"] = PlanSpec.from_config(cfg).to_json()
    else:
        out["labelmap_size"] = d.labelmap_size or cfg.data.img_size
    return json.loads(json.dumps(out))  # as the manifest stores it (tuples become lists)


def _topk(cfg: TrainConfig, index: ImageIndex) -> int:
    return min(cfg.distill.topk, len(index.classes))


def _setup(cfg: TrainConfig, index: ImageIndex) -> tuple[torch.device, torch.dtype | None, nn.Module]:
    device = resolve_device(cfg.run.device)
    teacher = load_teacher(cfg.distill, len(index.classes), cfg.data.img_size, device)
    return device, amp_dtype(cfg.run.amp, device), teacher


def build_replay(cfg: TrainConfig, index: ImageIndex, out: Path, epochs: int, console: Console) -> dict:
    """Run the teacher over the plan's views of epochs 0..epochs-1; resumes a killed build."""
    device, amp, teacher = _setup(cfg, index)
    spec = PlanSpec.from_config(cfg)
    steps, b = steps_per_epoch(spec, len(index)), spec.batch_size
    k = _topk(cfg, index)
    dtype = replay_dtype(k, len(index.classes))
    kind, _ = choose_loader(cfg.data.loader, device)
    manifest = {**identity(cfg, "replay", index, teacher), "topk": k,
                "shard_rows": max(1, SHARD_ROWS // b) * b, "record_dtype": dtype_text(dtype),
                "rows_per_epoch": steps * b, "built_with": {"loader": kind, "device": str(device), "amp": str(amp)}}
    writer = CacheWriter(out, manifest, dtype)
    first = writer.rows_done // b  # whole global batches already on disk
    live, loaders = LiveTeacher(teacher, amp), Loaders(kind, cfg.data, spec, device)
    with _progress(console) as bar:
        task = bar.add_task("replay cache", total=epochs * steps, completed=min(first, epochs * steps), img_s="-")
        for epoch in range(first // steps, epochs):
            seen, t0 = 0, _now(device)
            for batch in loaders.train(index, epoch, first - epoch * steps if epoch == first // steps else 0):
                x = apply_tail(batch.images.to(device, non_blocking=True), batch.labels, batch.plan,
                               len(index.classes), cfg.aug.smoothing, amp or torch.float32)
                writer.append(replay_records(live(x.images, batch.plan), k, dtype))
                seen += len(batch.labels)
                bar.update(task, advance=1, img_s=f"{seen / max(_now(device) - t0, 1e-9):.0f}")
    writer.finish()
    return writer.manifest


def _cell_probs(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities at every cell of a convnet's last feature map: the classifier
    applied position by position (its average over cells is the teacher's own logit)."""
    feats = teacher.forward_features(images)
    fc = teacher.get_classifier()
    if feats.dim() != 4 or not isinstance(fc, nn.Linear):
        raise UserError("--targets labelmap needs a convnet teacher (timm forward_features giving [b, c, h, w] "
                        "and a linear classifier)")
    logits = torch.einsum("bfhw,kf->bkhw", feats.float(), fc.weight.float()) + fc.bias.float().view(1, -1, 1, 1)
    return logits.softmax(dim=1)


def build_labelmap(cfg: TrainConfig, index: ImageIndex, out: Path, console: Console,
                   teacher: nn.Module | None = None) -> dict:
    """One teacher pass per whole image; resumes a killed build."""
    device = resolve_device(cfg.run.device)
    amp = amp_dtype(cfg.run.amp, device)
    teacher = teacher or load_teacher(cfg.distill, len(index.classes), cfg.data.img_size, device)
    size = cfg.distill.labelmap_size or cfg.data.img_size
    with torch.no_grad(), autocast(device, amp):
        probe = _cell_probs(teacher, torch.zeros(1, 3, size, size, device=device))
    grid = probe.shape[2]
    trained = getattr(teacher, "trained_img_size", None)
    if trained and trained != size:  # measured on the demo: a 64 px teacher at 128 px is near chance
        console.print(f"[yellow]warning:[/] the teacher was trained at {trained} px and its label maps are built "
                      f"at {size} px: a convnet away from its training scale can be far off "
                      f"(set distill.labelmap_size={trained})")
    if probe.shape[2] != probe.shape[3]:
        raise UserError(f"the teacher's feature map at {size} px is not square: {tuple(probe.shape[2:])}")
    k = _topk(cfg, index)
    dtype = labelmap_dtype(k, len(index.classes), grid * grid)
    manifest = {**identity(cfg, "labelmap", index, teacher), "topk": k, "grid": grid,
                "shard_rows": 4096, "record_dtype": dtype_text(dtype),
                "built_with": {"device": str(device), "amp": str(amp)}}
    writer = CacheWriter(out, manifest, dtype)
    loader = square_loader(index, size, cfg.data.eval_batch_size, cfg.data.workers,
                           rows=np.arange(writer.rows_done, len(index)))
    with _progress(console) as bar, torch.no_grad():
        task = bar.add_task("label maps", total=len(index), completed=writer.rows_done, img_s="-")
        seen, t0 = 0, _now(device)
        for images, _idx, _ok in loader:
            with autocast(device, amp):
                probs = _cell_probs(teacher, normalize(images.to(device)))
            writer.append(labelmap_records(probs.float(), k, dtype))
            seen += len(images)
            bar.update(task, advance=len(images), img_s=f"{seen / max(_now(device) - t0, 1e-9):.0f}")
    writer.finish()
    return writer.manifest


def verify(cfg: TrainConfig, index: ImageIndex, cache: Path, batches: int, console: Console) -> float:
    """Re-run the live teacher on `batches` random cached batches; the fraction of equal labels."""
    reader = CacheReader(cache)
    m = reader.manifest
    device, amp, teacher = _setup(cfg, index)
    reader.validate(identity(cfg, m["mode"], index, teacher))
    source = open_reader_source(cfg, index, reader)
    live, spec = LiveTeacher(teacher, amp), PlanSpec.from_config(cfg)
    steps = steps_per_epoch(spec, len(index))
    covered = reader.rows_available() // spec.batch_size if m["mode"] == "replay" else cfg.sched.epochs * steps
    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(covered, size=min(batches, covered), replace=False).tolist())
    loaders = Loaders(choose_loader(cfg.data.loader, device)[0], cfg.data, spec, device)
    equal = total = 0
    for g in picks:
        epoch, step = divmod(g, steps)
        batch = next(iter(loaders.train(index, epoch, step)))
        x = apply_tail(batch.images.to(device), batch.labels, batch.plan, len(index.classes), cfg.aug.smoothing,
                       amp or torch.float32)
        want = live(x.images, batch.plan).argmax(1)
        got = source(x.images, batch.plan)
        got = got if got.dim() == 1 else got.argmax(1)
        equal += int((want == got).sum())
        total += len(want)
    return equal / max(total, 1)


def open_reader_source(cfg: TrainConfig, index: ImageIndex, reader: CacheReader) -> TargetSource:
    m, d = reader.manifest, cfg.distill
    if m["mode"] == "replay":
        return ReplayTargets(reader, int(m["rows_per_epoch"]), len(index.classes), d.mode, d.tau)
    return LabelMapTargets(reader, index.sizes, int(m["grid"]), len(index.classes), d.mode, d.tau)


def open_targets(cfg: TrainConfig, index: ImageIndex, device: torch.device, amp: torch.dtype | None,
                 console: Console, world: World = SINGLE) -> tuple[TargetSource, LiveTeacher | None]:
    """The run's target source, and for labelmap a live teacher to measure agreement with.
    A labelmap cache that does not exist yet is built first (one teacher pass per image, by
    rank 0; the other ranks wait for its manifest, which is written last)."""
    d = cfg.distill
    on_device = d.targets != "replay"
    teacher = load_teacher(d, len(index.classes), cfg.data.img_size, device if on_device else torch.device("cpu"))
    live = LiveTeacher(teacher, amp)
    if d.targets == "live":
        return live, None
    cache = Path(d.teacher_cache or Path(cfg.run.out) / "teacher-labelmap")
    if d.targets == "labelmap" and not _labelmap_complete(cache, len(index)):
        if world.is_main:  # a build that was cut short resumes where it stopped
            console.print(f"no complete label map cache at {cache} yet: building it (one teacher pass per image)")
            build_labelmap(cfg, index, cache, console, teacher)
        else:  # a file poll, not a collective: the build may outlast any collective's timeout
            while not _labelmap_complete(cache, len(index)):
                time.sleep(2)
    reader = CacheReader(cache)
    if reader.manifest.get("mode") != d.targets:
        raise UserError(f"{cache} is a {reader.manifest.get('mode')} cache, not a {d.targets} one")
    reader.validate(identity(cfg, d.targets, index, teacher))
    if d.targets == "replay":
        covered = reader.rows_available() // int(reader.manifest["rows_per_epoch"])
        if covered < cfg.sched.epochs:
            raise UserError(f"teacher cache {cache} covers epochs 0-{covered - 1}, not epoch {covered} of this "
                            f"{cfg.sched.epochs}-epoch run: extend it with fastdeit cache-teacher --mode replay "
                            f"--epochs {cfg.sched.epochs}")
        if d.mode == "soft":
            console.print(f"note: soft targets are rebuilt from the cache's top-{reader.manifest['topk']} logits, "
                          f"the rest of the probability spread evenly over the other classes")
        built = reader.manifest.get("built_with", {})
        if built.get("amp") != str(amp) or built.get("device", "").split(":")[0] != device.type:
            console.print(f"note: {cache} was built on {built.get('device')} ({built.get('amp')}); this run is on "
                          f"{device} ({amp}): pixels and rounding differ slightly, labels almost never")
    return open_reader_source(cfg, index, reader), (live if d.targets == "labelmap" else None)


def _labelmap_complete(cache: Path, images: int) -> bool:
    return (cache / "manifest.json").exists() and CacheReader(cache).rows_available() >= images


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
