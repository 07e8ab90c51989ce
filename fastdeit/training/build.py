"""The composition root: a run's parts, built in one place from (config, world).

`build_run` goes through the phases in this order (the order fixes the initial weights and
the RNG streams, so it is part of what makes runs reproducible):

    data        the train and val indexes, the skip list applied; the loader choice
    student     seeded timm model -> attention backend (`auto`: measured on the device,
                remembered) -> DDP (students only; the teacher is frozen) -> torch.compile
    teacher     loaded; a cache the run builds for itself (label maps) built first when it
                does not exist (an explicit phase with its own progress bar), then the
                teacher source opened (distill/targets.TARGETS says what each source needs)
    optimizer   timm's factory, the per-update cosine schedule, the fp16 grad scaler, EMA
    loaders     DALI or the torch reference, executing the plan
    step        the Step (training/step.py) that prepares batches and updates the student

The Trainer receives the parts and only loops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from fastdeit.config.schema import TrainConfig, per_rank_batch, scaled_lr
from fastdeit.data.folder import ImageIndex, load_dataset
from fastdeit.data.loaders import Loaders, choose_loader, read_skip_list
from fastdeit.data.plan import PlanSpec, steps_per_epoch
from fastdeit.distill.cache_build import BUILDS
from fastdeit.distill.cache_format import TeacherId, is_complete, read_manifest
from fastdeit.distill.sources import TeacherSource, load_live
from fastdeit.distill.targets import TARGETS, Targets, cache_folder, open_teacher_source
from fastdeit.errors import ConfigError
from fastdeit.models.factory import (
    build_model,
    choose_attention,
    compile_model,
    is_distilled,
    set_attention,
    set_trainable,
)
from fastdeit.runtime import distributed as dist
from fastdeit.runtime.atomic import atomic_write_text
from fastdeit.runtime.device import amp_dtype, resolve_device
from fastdeit.runtime.distributed import SINGLE, World, cuda_index
from fastdeit.training.step import Step, make_step


@dataclass(frozen=True)
class Data:
    train: ImageIndex
    val: ImageIndex

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @cached_property
    def fingerprint(self) -> str:
        """The training data's fingerprint (checkpoints carry it: a resume must train on the same)."""
        return self.train.fingerprint()


class LrSchedule(Protocol):
    """What the loop asks of a learning-rate schedule: the lr of the next update, set after
    every update and on resume (timm's CosineLRScheduler per update, or `EpochStepped`), and
    its state in a checkpoint."""

    def step_update(self, num_updates: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunParts:
    """Everything a training run is made of; built by `build_run`."""

    cfg: TrainConfig
    world: World
    device: torch.device
    amp: torch.dtype | None  # the autocast dtype; None for fp32
    data: Data
    steps_per_epoch: int
    model: nn.Module  # the student itself (checkpoints, eval, EMA); the step trains its DDP/compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: LrSchedule  # per update, or per epoch as the official main.py (EpochStepped)
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    loaders: Loaders
    step: Step  # its teacher source carries the live teacher it is checked against (`live_check`)
    chosen: dict[str, str]  # what was picked and why: loader, attention, compile (the run's banner)


def load_data(cfg: TrainConfig, world: World = SINGLE) -> Data:
    """The run's data. Its index is stored in run.cache_dir after the first scan: the first
    process of each node scans (or checks the stored index), then the others reuse it."""
    def scan() -> Data:
        return Data(*read_skip_list(cfg.data.skip_list, *load_dataset(cfg.data.path,
                                                                      cache_dir=cfg.run.cache_dir or None)))

    data = scan() if world.local_rank == 0 else None
    dist.barrier(world)
    return data or scan()


def build_run(cfg: TrainConfig, world: World, console: Console) -> RunParts:
    """A run's parts, phase by phase (see the module docstring)."""
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", cuda_index(world))
    amp = amp_dtype(cfg.run.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # static shapes: each convolution's fastest algorithm, found once
    data = load_data(cfg, world)
    if len(data.classes) == 1:
        console.print(f"warning: {cfg.data.path} has a single class ({data.classes[0]}): a classifier has nothing "
                      f"to learn from it", markup=False)
    loader, loader_why = choose_loader(cfg.data.loader, device)
    steps = steps_per_epoch(PlanSpec.from_config(cfg), len(data.train))
    per_rank_batch(cfg, world.size)  # fails early when the global batch does not split into ranks
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, len(data.classes), cfg.data.img_size).to(device)
    if cfg.model.train_only != "all":
        trainable = set_trainable(model, cfg.model.train_only)
        console.print(f"training {cfg.model.train_only} parameters only: {trainable:,} of "
                      f"{sum(p.numel() for p in model.parameters()):,}")
    attn = attention_backend(cfg, model, world, device, amp, console)
    # DDP wraps the student only (the teacher is frozen); compiling the wrapper lets Dynamo
    # split the graph at DDP's bucket boundaries, so all-reduce overlaps backward.
    trained = wrap_ddp(cfg, model, world, device)
    compiled = compile_model(trained, cfg.run.compile)
    teacher, teacher_why = open_teacher(cfg, data, model, world, device, amp, console)
    optimizer = make_optimizer(cfg, model, device)
    scheduler = make_scheduler(cfg, optimizer, steps)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    ema = ModelEmaV3(model, decay=cfg.model.ema_decay) if cfg.model.ema else None
    step = make_step(cfg, device, amp, len(data.classes), teacher, model=trained, optimizer=optimizer,
                     scaler=scaler, ema=ema, rank=world.rank)
    loaders = Loaders(loader, cfg.data, PlanSpec.from_config(cfg), device, world.rank, world.size, cfg.sched.epochs,
                      step.tail)
    return RunParts(cfg, world, device, amp, data, steps, model, optimizer, scheduler, scaler, ema, loaders, step,
                    {"loader": f"{loader} ({loader_why})", "attention": attn or "-", "compile": compiled,
                     "teacher": teacher_why})


# `auto` attention choices of runs without run.cache_dir, for the rest of the process.
_MEASURED: dict[str, str] = {}


def attention_backend(cfg: TrainConfig, model: nn.Module, world: World, device: torch.device,
                      amp: torch.dtype | None, console: Console) -> str | None:
    """Set the student's attention backend; `auto` choices are remembered in one place:
    run.cache_dir/attention.json (else in this process), and every rank takes rank 0's (timing
    noise must not split them)."""
    path = Path(cfg.run.cache_dir) / "attention.json" if cfg.run.cache_dir else None
    if path is None:
        known = _MEASURED
    else:
        known = json.loads(path.read_text()) if path.exists() else {}
    backend, times = choose_attention(model, cfg.model.attn, cfg.run.batch_size // world.size,
                                      amp or torch.float32, device, known)
    if backend is not None and (agreed := dist.agree_with_main(backend, world)) != backend:
        backend = agreed
        set_attention(model, backend)
    if times:
        console.print(f"attention: {backend} (ms per forward+backward: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in times.items()) + ")")
        if path and world.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(known, indent=1), path)
    return backend


def wrap_ddp(cfg: TrainConfig, model: nn.Module, world: World, device: torch.device) -> nn.Module:
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # A distilled student trained without a teacher leaves its distillation head unused.
    unused = is_distilled(model) and cfg.distill.mode == "none"
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                   find_unused_parameters=unused)


def open_teacher(cfg: TrainConfig, data: Data, student: nn.Module, world: World, device: torch.device,
                 amp: torch.dtype | None, console: Console) -> tuple[TeacherSource | None, str]:
    """The teacher source of a distillation run (None without distillation), and what the run
    knows of its teacher (the banner's and config.json's `teacher`)."""
    d = cfg.distill
    if d.mode == "none":
        return None, "-"
    if not is_distilled(student) and cfg.model.name.startswith("deit3_"):
        raise ConfigError("distill.mode", f"{d.mode} needs a student with a distillation token, which DeiT III's "
                                          f"{cfg.model.name} has not (the official DeiT III trains without a "
                                          f"teacher): use --distill none, or a deit_*_distilled student")
    if not is_distilled(student):
        raise ConfigError("distill.mode", f"{d.mode} needs a student with a distillation token: use "
                                          f"{cfg.model.name}_distilled (or another deit_*_distilled)")
    targets = TARGETS[d.targets]
    if targets.reads_only and not d.teacher_ckpt:
        # Replaying a cache needs no teacher: loading (or downloading) its weights on every rank
        # would only check the cache's record of them, which --teacher-ckpt asks for.
        source = open_teacher_source(cfg, data.train, None, device, amp, console)
        recorded = TeacherId.recorded(cfg, read_manifest(cache_folder(cfg)))
        return source, (f"{recorded.name}, weights sha256 {recorded.sha256[:16]} as {cache_folder(cfg)} records "
                        f"them (not checked: no --teacher-ckpt)")
    # A source that reads the teacher's outputs needs its weights only to check the cache.
    live = load_live(cfg, len(data.classes), device, amp, run=targets.runs_teacher)
    prepare_cache(cfg, targets, data.train, live.teacher, world, console)
    who = TeacherId.of(live.teacher, cfg)
    return (open_teacher_source(cfg, data.train, live, device, amp, console),
            f"{who.name}, weights sha256 {who.sha256[:16]} from {d.teacher_ckpt or 'timm'}")


def prepare_cache(cfg: TrainConfig, targets: Targets, index: ImageIndex, teacher: nn.Module, world: World,
                  console: Console) -> None:
    """A cache the run builds for itself (label maps) that nobody has built: built here, with
    a progress bar, every rank building every N-th shard (a build cut short resumes)."""
    cache = cache_folder(cfg)
    if not targets.built_by_run or is_complete(cache, len(index)):
        return
    console.print(f"no complete {targets.cache} cache at {cache} yet: building it"
                  + (f" over {world.size} ranks" if world.distributed else ""))
    BUILDS[targets.cache](cfg, index, cache, console, world=world, teacher=teacher)


def make_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """timm's factory at the scaled lr: no weight decay on biases, norms and the model's
    no_weight_decay() set (pos_embed, cls/dist tokens); fused AdamW on CUDA."""
    o = cfg.optim
    check_apex(o.opt, device)
    extra = {"fused": True} if device.type == "cuda" and o.opt == "adamw" else {}
    if o.opt in ("adamw", "adam", "lamb", "lambw", "nadamw"):
        extra.update(betas=o.betas, eps=o.eps)
    try:
        return create_optimizer_v2(model, opt=o.opt, lr=scaled_lr(cfg), weight_decay=o.weight_decay, **extra)
    except (ValueError, KeyError, AssertionError, TypeError) as e:
        raise ConfigError("optim.opt", f"{o.opt!r}: {e}") from None


# timm's names for NVIDIA apex's fused optimizers, and the built-in one that does the same job.
APEX_OPTIMIZERS = {"fusedadam": "adam", "fusedadamw": "adamw", "fusedlamb": "lamb", "fusednovograd": "novograd",
                   "fusedsgd": "sgd"}


def check_apex(opt: str, device: torch.device) -> None:
    """apex is not on PyPI and never required: a fused apex optimizer without apex (or without
    a GPU) is one line saying how to get it and what to use instead (fused AdamW in torch on
    CUDA is what apex's FusedAdam provided)."""
    if opt not in APEX_OPTIMIZERS:
        return
    try:
        import apex  # noqa: F401  (only its presence matters: timm's factory imports what it needs)
    except ImportError:
        raise ConfigError("optim.opt", f"{opt} is NVIDIA apex's, which is not installed (it is not on PyPI: build it "
                          f"from github.com/NVIDIA/apex); optim.opt={APEX_OPTIMIZERS[opt]} does the same job "
                          f"without it") from None
    if device.type != "cuda":
        raise ConfigError("optim.opt", f"{opt} runs on CUDA only: use optim.opt={APEX_OPTIMIZERS[opt]} on this "
                          f"device")


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int) -> LrSchedule:
    """Per-update cosine with warm-up (sched.update=step); at epoch boundaries it equals DeiT's
    per-epoch values. sched.update=epoch: the official stepping (EpochStepped)."""
    s = cfg.sched
    if s.update == "epoch":
        return EpochStepped(CosineLRScheduler(optimizer, t_initial=s.epochs, lr_min=s.min_lr,
                                              warmup_lr_init=s.warmup_lr, warmup_t=s.warmup_epochs), steps)
    return CosineLRScheduler(optimizer, t_initial=s.epochs * steps, lr_min=s.min_lr,
                             warmup_t=round(s.warmup_epochs * steps), warmup_lr_init=s.warmup_lr, t_in_epochs=False)


class EpochStepped:
    """timm's per-epoch cosine stepped as the official DeiT main.py steps it: the lr is set once,
    by `scheduler.step(epoch)` after each epoch, so epoch e trains at the value of epoch e - 1
    (epochs 0 and 1 at the first value). The trainer calls `step_update(updates)` after every
    update (and on resume), as for the per-update schedule: the value depends only on the epoch
    the next update belongs to."""

    def __init__(self, scheduler: CosineLRScheduler, steps: int) -> None:
        self.scheduler, self.steps = scheduler, steps

    def step_update(self, num_updates: int) -> None:
        self.scheduler.step(max(num_updates // self.steps - 1, 0))

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)

