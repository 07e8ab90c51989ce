"""The registry of teacher sources: each value of `distill.targets` (`--targets`) declared once.

`TARGETS` says of each source what the rest of fastdeit needs to know: the kind of cache it
reads, what that cache's rows depend on, how an opened cache is checked against the run,
whether the teacher runs, whether the run builds the cache, and whether a run measures its
agreement with the live teacher. `open_teacher_source` opens the one a run's config asks for,
checking its cache against the run; `reading` gives the source of a cache kind. The sources
themselves and their records are distill/sources.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fastdeit.config.schema import TrainConfig
from fastdeit.data.folder import ImageIndex
from fastdeit.data.plan import PlanSpec
from fastdeit.distill.cache_format import CacheReader, TeacherId, identity
from fastdeit.distill.sources import LabelMapTeacher, LiveTeacher, ReplayTeacher, TeacherSource
from fastdeit.errors import ConfigError, UserError
from fastdeit.training.rundir import RunDir


def cache_folder(cfg: TrainConfig) -> Path:
    """The teacher cache a run reads: distill.teacher_cache, else the one it builds in its run folder."""
    return Path(cfg.distill.teacher_cache) if cfg.distill.teacher_cache else RunDir(cfg.run.out).labelmap_cache


@dataclass(frozen=True)
class Targets:
    """One value of `distill.targets` (`--targets`): where a run's teacher outputs come from,
    and all the rest of fastdeit needs to know of it. `TARGETS` declares each source once;
    config's `TeacherTargets` and `CacheMode` are kept equal to its names and cache kinds by a
    test. Building a cache runs the training Step, a layer above this module: the build of each
    cache kind is `distill/cache_build.BUILDS[kind]` (the same test keeps its kinds equal to these)."""

    name: str
    # The source, from the run's live teacher and, for a cached source, its cache (checked).
    open: Callable[[TrainConfig, ImageIndex, LiveTeacher | None, CacheReader | None], TeacherSource]
    cache: str | None = None  # the kind of teacher cache it reads (a manifest's mode); None: no cache
    # What its cache's rows depend on besides the teacher and the data (teacher_cache.identity).
    own_identity: Callable[[TrainConfig], dict[str, Any]] | None = None
    # Checks of an opened cache against the run beyond its identity (reader, amp, device, console).
    check: Callable[..., None] | None = None
    # The global batches of the run's plan its cache covers (`--verify` samples among them);
    # None: every batch of the run's epochs.
    covered: Callable[[TrainConfig, CacheReader], int] | None = None
    runs_teacher: bool = True  # False: the teacher's weights only check the cache (loaded on the CPU)
    built_by_run: bool = False  # a missing cache is built by the training run, in its run folder
    live_check: bool = False  # a run also runs the live teacher on distill.agreement_batches batches

    def identity(self, cfg: TrainConfig, index: ImageIndex, teacher: TeacherId) -> dict[str, Any]:
        """What the rows of this source's cache mean, for `cfg`'s run."""
        own = self.own_identity(cfg) if self.own_identity else {}
        return identity(cfg, self.cache, index, teacher, own)

    @property
    def reads_only(self) -> bool:
        """It only reads a cache someone built: the teacher's weights would only check whose
        outputs the cache holds."""
        return self.cache is not None and not (self.runs_teacher or self.built_by_run or self.live_check)


def _open_replay(cfg: TrainConfig, index: ImageIndex, live: LiveTeacher | None,
                 reader: CacheReader) -> ReplayTeacher:
    d = cfg.distill
    return ReplayTeacher(reader, int(reader.manifest["rows_per_epoch"]), len(index.classes), d.mode, d.tau)


def _replay_identity(cfg: TrainConfig) -> dict[str, Any]:
    d, out = cfg.distill, {"plan": PlanSpec.from_config(cfg).to_json()}
    if d.teacher_img_size and d.teacher_img_size != cfg.data.img_size:  # the teacher saw resized views
        out["teacher_img_size"] = d.teacher_img_size
    return out


def _replay_batches(cfg: TrainConfig, reader: CacheReader) -> int:
    return reader.rows_available() // cfg.run.batch_size


def _check_replay(cfg: TrainConfig, reader: CacheReader, amp: torch.dtype | None, device: torch.device,
                  console: Console) -> None:
    covered, cache = reader.rows_available() // int(reader.manifest["rows_per_epoch"]), reader.root
    if covered < cfg.sched.epochs:
        has = f"covers epochs 0-{covered - 1}, not epoch {covered}" if covered else "covers no whole epoch"
        raise UserError(f"teacher cache {cache} {has} of this {cfg.sched.epochs}-epoch run: extend it with "
                        f"fastdeit cache-teacher --mode replay --epochs {cfg.sched.epochs}")
    if cfg.distill.mode == "soft":
        console.print(f"note: soft targets are rebuilt from the cache's top-{reader.manifest['topk']} logits, "
                      f"the rest of the probability spread evenly over the other classes")
    built = reader.manifest.get("built_with", {})
    if built.get("amp") != str(amp) or built.get("device", "").split(":")[0] != device.type:
        console.print(f"note: {cache} was built on {built.get('device')} ({built.get('amp')}); this run is on "
                      f"{device} ({amp}): pixels and rounding differ slightly, labels almost never")


def _open_labelmap(cfg: TrainConfig, index: ImageIndex, live: LiveTeacher | None,
                   reader: CacheReader) -> LabelMapTeacher:
    d = cfg.distill
    return LabelMapTeacher(reader, index.sizes, int(reader.manifest["grid"]), len(index.classes), d.mode, d.tau)


def _labelmap_identity(cfg: TrainConfig) -> dict[str, Any]:
    return {"labelmap_size": cfg.distill.labelmap_size or cfg.data.img_size}


TARGETS = {t.name: t for t in (
    Targets("live", open=lambda cfg, index, live, reader: live),
    Targets("replay", open=_open_replay, cache="replay", own_identity=_replay_identity, check=_check_replay,
            covered=_replay_batches, runs_teacher=False),
    Targets("labelmap", open=_open_labelmap, cache="labelmap", own_identity=_labelmap_identity, built_by_run=True,
            live_check=True),
)}


def reading(mode: str) -> Targets:
    """The source that reads caches of this kind (a manifest's mode)."""
    found = [t for t in TARGETS.values() if t.cache == mode]
    if not found:
        raise UserError(f"a teacher cache of mode {mode!r} is not one this fastdeit reads "
                        f"({', '.join(t.cache for t in TARGETS.values() if t.cache)})")
    return found[0]


def open_teacher_source(cfg: TrainConfig, index: ImageIndex, live: LiveTeacher | None, device: torch.device,
                        amp: torch.dtype | None, console: Console) -> TeacherSource:
    """The run's teacher source (`live_check` set where its entry measures agreement). A
    cache must exist (one the run builds for itself is built first: build.prepare_cache) and
    match the run: teacher, data, plan, epochs; otherwise one line says what differs. `live`
    None (a source that only reads its cache, no --teacher-ckpt): the cache's own record of its
    teacher is taken (TeacherId.recorded)."""
    t = TARGETS[cfg.distill.targets]
    reader = None
    if t.cache is not None:
        if not (t.built_by_run or cfg.distill.teacher_cache):
            raise ConfigError("distill.targets", f"{t.name} needs distill.teacher_cache CACHE (build one with "
                                                 f"fastdeit cache-teacher --mode {t.cache})")
        reader = CacheReader(cache_folder(cfg))
        if reader.manifest.get("mode") != t.cache:
            raise UserError(f"{reader.root} is a {reader.manifest.get('mode')} cache, not a {t.cache} one")
        who = TeacherId.of(live.teacher, cfg) if live is not None else TeacherId.recorded(cfg, reader.manifest)
        reader.validate(t.identity(cfg, index, who))
        if t.check is not None:
            t.check(cfg, reader, amp, device, console)
    source = t.open(cfg, index, live, reader)
    source.live_check = live if t.live_check else None
    return source
