"""`fastdeit cache-teacher`: build a teacher cache, or verify one against the live teacher.

replay:   the teacher runs once over exactly the augmented, mixed views the plan produces for
          epochs 0..E-1 (the run's own Step prepares them, with the live teacher as its
          source) and its argmax, top-k logits and logsumexp are stored per (epoch, position).
labelmap: the teacher runs once per image on the whole image; the class probabilities at
          every cell of its last feature map are stored (top-k per cell).

The cache format is distill/cache_format.py's; opening a cache for a run is distill/targets.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from fastdeit.config.schema import CacheMode, TrainConfig
from fastdeit.data.folder import ImageIndex, load_dataset
from fastdeit.data.loaders import Loaders, choose_loader, read_skip_list
from fastdeit.data.plan import PlanSpec, steps_per_epoch
from fastdeit.distill.cache_format import MANIFEST, CacheReader, CacheWriter, TeacherId, dtype_text, read_manifest
from fastdeit.distill.sources import (
    agreement,
    cell_probs,
    labelmap_dtype,
    labelmap_records,
    load_live,
    replay_dtype,
    replay_records,
)
from fastdeit.distill.targets import TARGETS, reading
from fastdeit.errors import Requeue, Stopped, UserError
from fastdeit.pipelines.reference import square_loader
from fastdeit.pipelines.tail import normalize
from fastdeit.runtime import signals
from fastdeit.runtime.device import amp_dtype, autocast, resolve_device, sync
from fastdeit.runtime.distributed import SINGLE, World, all_reduce, barrier, cuda_index
from fastdeit.training.step import Step, make_step


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[img_s]} img/s"), TimeRemainingColumn(), console=console)


def _topk(cfg: TrainConfig, index: ImageIndex) -> int:
    return min(cfg.distill.topk, len(index.classes))


def live_step(cfg: TrainConfig, index: ImageIndex, world: World = SINGLE) -> tuple[Step, nn.Module]:
    """The run's Step (prepare only) with the live teacher as its source, and the teacher."""
    device = world_device(cfg, world)
    amp = amp_dtype(cfg.run.amp, device)
    live = load_live(cfg, len(index.classes), device, amp)  # as a live run has it
    return make_step(cfg, device, amp, len(index.classes), live), live.teacher


def _owned(writer: CacheWriter, total: int, world: World) -> list[int]:
    """This rank's shards (every world.size-th) that are not finished yet."""
    n = writer.shard_rows
    return [k for k in range(world.rank, -(-total // n), world.size) if not writer.shard_done(k, min(n, total - k * n))]


def _open_writer(out: Path, manifest: dict, dtype: np.dtype, world: World) -> CacheWriter:
    """Rank 0 creates (or checks) the cache; then every rank opens it."""
    writer = CacheWriter(out, manifest, dtype) if world.is_main else None
    barrier(world)
    return writer or CacheWriter(out, manifest, dtype, create=False)


def _build(writer: CacheWriter, todo: list[int], total: int,
           make: Callable[[int, int, Callable[[int], None]], np.ndarray], label: str, device: torch.device,
           world: World, console: Console) -> dict:
    """Make and write each shard of `todo` (rows [k * shard_rows, ...) by `make(first, last,
    tick)`), then let rank 0 finish the manifest once every rank is done."""
    for name in writer.rebuilt:
        console.print(f"{writer.root / name} does not match its checksum (corrupted, or copied from another "
                      f"cache): building it again")
    n = writer.shard_rows
    written = int(all_reduce(torch.tensor([len(todo)], device=device), world).item())  # shards, all ranks
    if not written:
        console.print(f"{writer.root} already holds the {total} rows asked for: nothing to build")
    with _progress(console) as bar:
        task = bar.add_task(label + (f" (rank 0 of {world.size})" if world.distributed else ""),
                            total=sum(min(n, total - k * n) for k in todo), img_s="-")
        seen, t0 = 0, _now(device)

        def tick(images: int) -> None:
            nonlocal seen
            seen += images
            bar.update(task, advance=images, img_s=f"{seen / max(_now(device) - t0, 1e-9):.0f}")

        for k in todo:
            writer.write_shard(k, make(k * n, min((k + 1) * n, total), tick))
            if signals.requested():  # the shard is whole; the rest is left for the next start
                break
    # Every rank finishes its shard in hand, then all learn whether any of them was asked to stop.
    asked = all_reduce(torch.tensor([signals.requested() is not None, signals.requested() == signals.REQUEUE],
                                    dtype=torch.float32, device=device), world).tolist()
    if asked[0]:
        raise (Requeue if asked[1] else Stopped)(f"stopped; the shards written to {writer.root} are kept: run the "
                                                 f"same command again to continue")
    if world.is_main:
        writer.finish(added=written > 0)
    return read_manifest(writer.root)


def build_replay(cfg: TrainConfig, index: ImageIndex, out: Path, epochs: int, console: Console,
                 world: World = SINGLE) -> dict:
    """Run the teacher over the plan's views of epochs 0..epochs-1; resumes a killed build.
    A shard is whole global batches, planned as one process plans them, so N ranks (each
    building every N-th shard) write the bytes one process would."""
    step, teacher = live_step(cfg, index, world)
    spec = PlanSpec.from_config(cfg)
    steps, b = steps_per_epoch(spec, len(index)), spec.batch_size
    k = _topk(cfg, index)
    dtype = replay_dtype(k, len(index.classes))
    kind, _ = choose_loader(cfg.data.loader, step.device)
    manifest = {**TARGETS["replay"].identity(cfg, index, TeacherId.of(teacher, cfg)), "topk": k,
                "shard_rows": max(1, cfg.distill.cache_shard_rows // b) * b, "record_dtype": dtype_text(dtype),
                "rows_per_epoch": steps * b,
                "built_with": {"loader": kind, "device": str(step.device), "amp": str(step.amp)}}
    writer = _open_writer(out, manifest, dtype, world)
    total = epochs * steps * b
    loaders = Loaders(kind, cfg.data, spec, step.device, epochs=epochs)

    def make(first: int, last: int, tick: Callable[[int], None]) -> np.ndarray:
        parts, g = [], first // b
        while g < last // b:
            epoch, at = divmod(g, steps)
            for batch in loaders.train(index, epoch, at):  # to the epoch's end or the shard's
                parts.append(replay_records(step.prepare(batch).teacher, k, dtype))
                tick(len(batch.labels))
                g += 1
                if g == last // b:
                    break
        return np.concatenate(parts)

    return _build(writer, _owned(writer, total, world), total, make, "replay cache", step.device, world, console)


def build_labelmap(cfg: TrainConfig, index: ImageIndex, out: Path, console: Console,
                   teacher: nn.Module | None = None, world: World = SINGLE) -> dict:
    """One teacher pass per whole image; resumes a killed build. Each shard's images are
    batched from the shard's first row, so N ranks write the bytes one process would."""
    device = world_device(cfg, world)
    amp = amp_dtype(cfg.run.amp, device)
    teacher = teacher or load_live(cfg, len(index.classes), device, amp).teacher
    size = cfg.distill.labelmap_size or cfg.data.img_size
    with torch.no_grad(), autocast(device, amp):
        probe = cell_probs(teacher, torch.zeros(1, 3, size, size, device=device))
    grid = probe.shape[2]
    trained = getattr(teacher, "trained_img_size", None)
    if trained and trained != size:  # measured on the demo: a 64 px teacher at 128 px is near chance
        console.print(f"warning: the teacher was trained at {trained} px and its label maps are built "
                      f"at {size} px: a convnet away from its training scale can be far off "
                      f"(set distill.labelmap_size={trained})")
    if probe.shape[2] != probe.shape[3]:
        raise UserError(f"the teacher's feature map at {size} px is not square: {tuple(probe.shape[2:])}")
    k = _topk(cfg, index)
    dtype = labelmap_dtype(k, len(index.classes), grid * grid)
    manifest = {**TARGETS["labelmap"].identity(cfg, index, TeacherId.of(teacher, cfg)), "topk": k, "grid": grid,
                "shard_rows": labelmap_shard_rows(out, dtype, cfg.distill.cache_shard_rows),
                "record_dtype": dtype_text(dtype), "built_with": {"device": str(device), "amp": str(amp)}}
    writer = _open_writer(out, manifest, dtype, world)

    def make(first: int, last: int, tick: Callable[[int], None]) -> np.ndarray:
        parts = []
        loader = square_loader(index, size, cfg.data.eval_batch_size, cfg.data.workers, rows=np.arange(first, last))
        with torch.no_grad():
            for images, _idx, _ok in loader:
                with autocast(device, amp):
                    probs = cell_probs(teacher, normalize(images.to(device)))
                parts.append(labelmap_records(probs.float(), k, dtype))
                tick(len(images))
        return np.concatenate(parts)

    return _build(writer, _owned(writer, len(index), world), len(index), make, "label maps", device, world, console)


# A label map shard's bytes at most. A training batch's rows are spread over the whole cache,
# so its lookup touches about every shard, at a few microseconds each (CacheReader.rows):
# ImageNet's maps (7 x 7 cells, top-5) are 38 shards of this size, not 313 of 4,096 rows.
# Shards stay the unit of resuming and of the split over ranks, so they are not one file.
LABELMAP_SHARD_BYTES = 32 * 2**20


def labelmap_shard_rows(out: Path, dtype: np.dtype, asked: int) -> int:
    """Rows per label map shard: `distill.cache_shard_rows`, at most LABELMAP_SHARD_BYTES a
    shard; a cache being resumed keeps its own (caches built before this rule had 4,096)."""
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        kept = old.get("shard_rows") if isinstance(old, dict) else None
        same = isinstance(old, dict) and old.get("mode") == "labelmap" and old.get("record_dtype") == dtype_text(dtype)
        if same and type(kept) is int and kept >= 1:  # anything else (true, "8", -1): the writer names it
            return kept
    return max(1, min(asked, LABELMAP_SHARD_BYTES // dtype.itemsize))


def _replay_for_the_run(cfg: TrainConfig, index: ImageIndex, out: Path, console: Console, world: World = SINGLE,
                        teacher: nn.Module | None = None) -> dict:
    return build_replay(cfg, index, out, cfg.sched.epochs, console, world)  # the Step runs its own live teacher


# How each kind of teacher cache is built for a run's config (into `out`, resuming what is
# there), by the kind targets.TARGETS names: `cache-teacher --mode`, a run that builds its own
# cache (build.prepare_cache) and the demo all build through this table.
BUILDS: dict[str, Callable[..., dict]] = {"replay": _replay_for_the_run, "labelmap": build_labelmap}


def world_device(cfg: TrainConfig, world: World) -> torch.device:
    """The run's device; on CUDA, this rank's GPU."""
    device = resolve_device(cfg.run.device)
    return torch.device("cuda", cuda_index(world)) if device.type == "cuda" else device


def verify_steps(cfg: TrainConfig, index: ImageIndex, cache: Path) -> tuple[Step, Step]:
    """The run's Step with the live teacher as its source, and the same Step reading the cache
    (checked against the run first)."""
    reader = CacheReader(cache)
    targets = reading(reader.manifest.get("mode"))
    live, teacher = live_step(cfg, index)
    reader.validate(targets.identity(cfg, index, TeacherId.of(teacher, cfg)))
    source = targets.open(cfg, index, live.teacher, reader)
    return live, make_step(cfg, live.device, live.amp, len(index.classes), source)


def verify(cfg: TrainConfig, index: ImageIndex, cache: Path, batches: int, console: Console) -> float:
    """Re-run the live teacher on `batches` random cached batches, prepared by the run's Step
    with the cache as its source; the fraction of equal hard labels."""
    live, cached = verify_steps(cfg, index, cache)
    spec = PlanSpec.from_config(cfg)
    steps = steps_per_epoch(spec, len(index))
    reader = cached.teacher.reader
    covers = reading(reader.manifest["mode"]).covered
    covered = covers(cfg, reader) if covers else cfg.sched.epochs * steps
    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(covered, size=min(batches, covered), replace=False).tolist())
    loaders = Loaders(choose_loader(cfg.data.loader, live.device)[0], cfg.data, spec, live.device)
    counts = torch.zeros(2, dtype=torch.float64, device=live.device)  # equal, total
    with _progress(console) as bar:
        task = bar.add_task("verifying", total=len(picks), img_s="-")
        for g in picks:
            epoch, at = divmod(g, steps)
            prepared = cached.prepare(next(iter(loaders.train(index, epoch, at))))
            counts += agreement(live.teacher, prepared.images, prepared.plan, prepared.teacher)
            bar.update(task, advance=1)
    equal, total = counts.tolist()
    return equal / max(total, 1)


def cache_teacher(cfg: TrainConfig, mode: CacheMode, out: Path, verify_batches: int, console: Console,
                  world: World = SINGLE) -> dict:
    """The `fastdeit cache-teacher` command: build (or resume building) the cache, this rank's
    share of it in a worker group, or with `verify_batches` re-run the teacher on that many
    cached batches. Returns what to print."""
    train, _ = read_skip_list(cfg.data.skip_list, *load_dataset(cfg.data.path, cache_dir=cfg.run.cache_dir or None))
    if verify_batches:
        agreed = verify(cfg, train, out, verify_batches, console)
        console.print(f"{verify_batches} batches re-run: {agreed:.2%} of the cached hard labels equal the "
                      f"live teacher's")
        return {"verify_batches": verify_batches, "agreement": agreed}
    manifest = BUILDS[mode](cfg, train, out, console, world=world)
    console.print(f"teacher cache ready in {out} ({mode}, {manifest['teacher']})")
    return {"cache": str(out), "mode": mode, "rows": CacheReader(out).rows_available()}


def _now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()
