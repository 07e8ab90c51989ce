"""The training loop: the one place that touches the run folder.

A run folder holds config.json (the resolved config), metrics.jsonl (one JSON object per
logged step and per epoch), checkpoint-last.pt, checkpoint-best.pt and summary.json.
Checkpoints are written to a temporary name and renamed, so a crash never leaves a torn one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from fastdeit import dist
from fastdeit.caching import open_targets
from fastdeit.config import TrainConfig, per_rank_batch, save_json, scaled_lr
from fastdeit.data.folder import load_dataset
from fastdeit.dist import SINGLE, World
from fastdeit.distill import DistillationLoss
from fastdeit.engine import EvalResult, Stepper, amp_dtype, evaluate, resolve_device
from fastdeit.errors import UserError
from fastdeit.loaders import Loaders, choose_loader, read_skip_list
from fastdeit.models import build_model, choose_attention, compile_model, is_distilled, set_attention
from fastdeit.pipelines.tail import apply_tail
from fastdeit.plan import PlanSpec, steps_per_epoch
from fastdeit.progress import TrainProgress
from fastdeit.runfiles import atomic_save, atomic_write_text, git_commit, refuse_existing_run, sigint_once
from fastdeit.targets import LiveTeacher, TargetSource

CKPT_FORMAT = 1


class _Stop(Exception):
    """Raised between steps when a stop was requested (Ctrl-C)."""


@dataclass
class RunState:
    """Where the run stands: the plan position and what has been measured so far."""

    epoch: int = 0  # the epoch to run next (or being run)
    step: int = 0  # the step within `epoch` to run next
    updates: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    elapsed: float = 0.0  # training seconds over all invocations
    last_eval: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(self, cfg: TrainConfig, console: Console | None = None, world: World = SINGLE) -> None:
        self.cfg, self.world = cfg, world
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.out = Path(cfg.run.out)
        self.device = resolve_device(cfg.run.device)
        if self.device.type == "cuda" and world.distributed:
            self.device = torch.device("cuda", world.local_rank)
        self.amp = amp_dtype(cfg.run.amp, self.device)
        self.train_index, self.val_index = read_skip_list(cfg.data.skip_list, *load_dataset(cfg.data.path))
        self.classes = self.train_index.classes
        self.loader_kind, self.loader_why = choose_loader(cfg.data.loader, self.device)
        self.spec = PlanSpec.from_config(cfg)
        self.steps = steps_per_epoch(self.spec, len(self.train_index))
        per_rank_batch(cfg, world.size)  # fails early when the global batch does not split into ranks
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model, len(self.classes), cfg.data.img_size).to(self.device)
        self.attn = self._attention()
        self.stochastic = any(getattr(m, "drop_prob", 0) > 0 or (isinstance(m, torch.nn.Dropout) and m.p > 0)
                              for m in self.model.modules())
        # DDP wraps the student only (the teacher is frozen); compiling the wrapper lets
        # Dynamo split the graph at DDP's bucket boundaries, so all-reduce overlaps backward.
        self.train_model = self._ddp()
        self.compile_mode = compile_model(self.train_model, cfg.run.compile, self.device)
        self.agreement_live: LiveTeacher | None = None  # labelmap: a live teacher to measure agreement
        self.targets = self._targets()
        self.optimizer = self._optimizer()
        # Per-update cosine with warm-up; at epoch boundaries it equals DeiT's per-epoch values.
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=cfg.sched.epochs * self.steps, lr_min=cfg.sched.min_lr,
            warmup_t=round(cfg.sched.warmup_epochs * self.steps), warmup_lr_init=cfg.sched.warmup_lr,
            t_in_epochs=False)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        self.ema = ModelEmaV3(self.model, decay=cfg.model.ema_decay) if cfg.model.ema else None
        self.loaders = Loaders(self.loader_kind, cfg.data, self.spec, self.device, world.rank, world.size)
        self.stepper = Stepper(self.train_model, self.optimizer,
                               DistillationLoss(cfg.distill.mode, cfg.distill.alpha, cfg.distill.tau),
                               self.amp, self.scaler, cfg.optim.clip_grad, self.ema)
        self.state = RunState()
        self.bad_seen: set[str] = set()
        self.stop_requested = False

    def _attention(self) -> str | None:
        """The attention backend; `auto` choices are remembered in run.cache_dir/attention.json."""
        path = Path(self.cfg.run.cache_dir) / "attention.json" if self.cfg.run.cache_dir else None
        known = json.loads(path.read_text()) if path and path.exists() else {}
        backend, times = choose_attention(self.model, self.cfg.model.attn, self.cfg.run.batch_size // self.world.size,
                                          self.amp or torch.float32, self.device, known)
        if backend is not None and (agreed := dist.agree_with_main(backend, self.world)) != backend:
            backend = agreed  # timing noise must not split the ranks
            set_attention(self.model, backend)
        if times:
            self.console.print(f"attention: {backend} (ms per forward+backward: "
                               + ", ".join(f"{k} {v:.3f}" for k, v in times.items()) + ")")
            if path and self.world.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(json.dumps(known, indent=1), path)
        return backend

    def _ddp(self) -> torch.nn.Module:
        if not self.world.distributed:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # A distilled student trained without a teacher leaves its distillation head unused.
        unused = is_distilled(self.model) and self.cfg.distill.mode == "none"
        return DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True,
                                       find_unused_parameters=unused)

    def _optimizer(self) -> torch.optim.Optimizer:
        """timm's factory: no weight decay on biases, norms and the model's no_weight_decay()
        set (pos_embed, cls/dist tokens); fused AdamW on CUDA."""
        o = self.cfg.optim
        extra = {"fused": True} if self.device.type == "cuda" and o.opt == "adamw" else {}
        if o.opt in ("adamw", "adam", "lamb", "lambw", "nadamw"):
            extra.update(betas=o.betas, eps=o.eps)
        try:
            return create_optimizer_v2(self.model, opt=o.opt, lr=scaled_lr(self.cfg), weight_decay=o.weight_decay,
                                       **extra)
        except (ValueError, KeyError, AssertionError, TypeError) as e:
            raise UserError(f"optim.opt {o.opt!r}: {e}") from None

    def _targets(self) -> TargetSource | None:
        d = self.cfg.distill
        if d.mode == "none":
            return None
        if not is_distilled(self.model):
            raise UserError(f"--distill {d.mode} needs a student with a distillation token: "
                            f"use {self.cfg.model.name}_distilled (or another deit_*_distilled)")
        source, self.agreement_live = open_targets(self.cfg, self.train_index, self.device, self.amp, self.console,
                                                   self.world)
        return source

    # --- checkpoints ---------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"model": {"name": m.name, "patch_size": m.patch_size, "depth": m.depth,
                          "embed_dim": m.embed_dim, "num_heads": m.num_heads, "width": m.width},
                "img_size": self.cfg.data.img_size, "num_classes": len(self.classes),
                "classes": list(self.classes), "crop_pct": self.cfg.data.crop_pct}

    def checkpoint(self) -> dict[str, Any]:
        s = self.state
        return {
            "format": CKPT_FORMAT, "meta": self.meta(), "config": self.cfg.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "ema": self.ema.state_dict() if self.ema else {},
            "state": {"epoch": s.epoch, "step": s.step, "updates": s.updates, "best_top1": s.best_top1,
                      "elapsed": s.elapsed, "last_eval": s.last_eval},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
        }

    def save(self, best: bool = False) -> None:
        if not self.world.is_main:
            return
        last = self.out / "checkpoint-last.pt"
        atomic_save(self.checkpoint(), last)
        if best:
            tmp = self.out / "checkpoint-best.pt.tmp"
            shutil.copyfile(last, tmp)
            os.replace(tmp, self.out / "checkpoint-best.pt")

    def resume(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"--resume: no checkpoint at {path}")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
            raise UserError(f"--resume: {path} is not a fastdeit training checkpoint")
        theirs = ck["meta"]["model"]
        ours = self.meta()["model"]
        if theirs != ours:
            raise UserError(f"--resume: {path} is a checkpoint of {theirs['name']} {theirs}, "
                            f"not of this run's {ours['name']} {ours}")
        old = PlanSpec.from_config(TrainConfig.from_dict(ck["config"])).to_json()
        if old != self.spec.to_json():
            keys = [k for k in old if old[k] != self.spec.to_json()[k]]
            raise UserError(f"--resume: the checkpoint's augmentation plan differs in {keys}; "
                            f"resume with the same seed, batch size, image size and aug settings")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.scaler and ck["scaler"]:
            self.scaler.load_state_dict(ck["scaler"])
        if self.ema and ck["ema"]:
            self.ema.load_state_dict(ck["ema"])
        st = ck["state"]
        self.state = RunState(epoch=st["epoch"], step=st["step"], updates=st["updates"],
                              best_top1=st["best_top1"], elapsed=st["elapsed"], last_eval=st["last_eval"])
        torch.set_rng_state(ck["rng"]["torch"])
        if self.device.type == "cuda" and ck["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])

    # --- metrics ---------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if self.world.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- the loop --------------------------------------------------------------------------

    def fit(self, resume: Path | None = None, restarted: bool = False) -> dict[str, Any]:
        """Train to the last epoch (from `resume` if given), evaluate, write summary.json.
        `restarted`: torchrun restarted the worker group; the run folder is this run's own."""
        start = time.perf_counter()
        if resume is None and not restarted:
            refuse_existing_run(self.out)
        dist.barrier(self.world)  # every rank has looked before rank 0 writes
        self.out.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self.resume(resume)
            self.log({"kind": "resume", "epoch": self.state.epoch, "step": self.state.step,
                      "from": str(resume), "world": self.world.size})
        if self.world.is_main:
            atomic_write_text(save_json(self.cfg), self.out / "config.json")
        self.console.print(f"[bold]{self.cfg.model.name}[/] on {len(self.train_index)} images, "
                           f"{len(self.classes)} classes, {self.device}, batch {self.cfg.run.batch_size}, "
                           f"{self.steps} steps/epoch, lr {scaled_lr(self.cfg):.2e}, distill {self.cfg.distill.mode}"
                           + (f", {self.world.size} ranks" if self.world.distributed else ""))
        self.console.print(f"loader: {self.loader_kind} ({self.loader_why}); attention: {self.attn or '-'}; "
                           f"compile: {self.compile_mode}")
        images, seconds = 0, 0.0
        epochs = self.cfg.sched.epochs
        with TrainProgress(self.console, enabled=self.cfg.run.progress and self.world.is_main) as bar, \
                self.stop_on_sigint():
            try:
                while self.state.epoch < epochs:
                    stats = self.train_epoch(bar)
                    images, seconds = images + stats["images"], seconds + stats["seconds"]
                    e = self.state.epoch
                    self.state.epoch, self.state.step = e + 1, 0
                    self.end_epoch(e, stats, evaluate_now=(e + 1) % self.cfg.run.eval_every == 0 or e + 1 == epochs)
            except _Stop:
                self.save()
                raise UserError(f"interrupted at epoch {self.state.epoch} step {self.state.step}; "
                                f"saved {self.out / 'checkpoint-last.pt'}: continue with --resume") from None
        return self.summarize(images, seconds, time.perf_counter() - start)

    def stop_on_sigint(self) -> AbstractContextManager[None]:
        """Ctrl-C finishes the current step, saves a checkpoint and stops (a second Ctrl-C
        stops at once, keeping the last checkpoint), so a resumed run stays exact."""

        def first() -> None:
            self.stop_requested = True
            self.console.print("stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

        return sigint_once(first)

    def train_epoch(self, bar: TrainProgress) -> dict[str, float]:
        """Run the rest of the current epoch; returns images, seconds, img/s and data-wait."""
        cfg, st = self.cfg, self.state
        epoch = st.epoch
        loader = self.loaders.train(self.train_index, epoch, st.step)
        bar.start_epoch(epoch, cfg.sched.epochs, self.steps, st.step)
        t0 = tick = time.perf_counter()
        wait = images = 0.0
        first_step, agree = st.step, np.zeros(2)
        window = {"t": tick, "n": 0, "wait": 0.0}
        for batch in loader:
            now = time.perf_counter()
            wait += now - tick
            window["wait"] += now - tick
            self.note_bad(batch.bad)
            x = batch.images.to(self.device, non_blocking=True)
            tail = apply_tail(x, batch.labels, batch.plan, len(self.classes), cfg.aug.smoothing,
                              self.amp or torch.float32)
            teacher = self.targets(tail.images, batch.plan) if self.targets else None
            if self.agreement_live is not None and st.step - first_step < cfg.distill.agreement_batches:
                agree += self.agreement(tail.images, batch.plan, teacher)
            if self.stochastic:  # drop path / dropout masks: a function of the step, so resume is exact
                torch.manual_seed(dist.step_seed(cfg.run.seed, self.world.rank, st.updates))
            parts = self.stepper.step(tail.images, tail.targets, teacher, st.updates + 1)
            st.updates += 1
            st.step += 1
            self.scheduler.step_update(st.updates)
            images += len(batch.labels) * self.world.size  # every rank holds an equal shard
            window["n"] += len(batch.labels) * self.world.size
            tick = time.perf_counter()
            if st.updates % cfg.run.log_every == 0 or st.step == self.steps:
                rec = self.step_record(parts, window, tick, len(batch.bad))
                bar.update(st.step, rec["loss"], rec["img_s"])
                window = {"t": tick, "n": 0, "wait": 0.0}
            else:
                bar.update(st.step)
            if self.stop_requested:
                raise _Stop
            if cfg.run.ckpt_every and st.updates % cfg.run.ckpt_every == 0 and st.step < self.steps:
                st.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.save()
                tick = time.perf_counter()
            dist.fault_injection(st.updates, self.world)
        seconds = time.perf_counter() - t0
        st.elapsed += seconds
        stats = {"images": images, "seconds": seconds, "train_img_s": images / max(seconds, 1e-9),
                 "data_wait": wait / max(seconds, 1e-9)}
        agree = dist.all_reduce(torch.tensor(agree, dtype=torch.float64), self.world).tolist()
        if agree[1]:
            stats["target_agreement"] = agree[0] / agree[1]
        return stats

    def agreement(self, images: torch.Tensor, plan: Any, targets: torch.Tensor) -> np.ndarray:
        """(equal, total) hard labels of the cached targets and the live teacher on this batch."""
        live = self.agreement_live(images, plan).argmax(1)
        got = targets if targets.dim() == 1 else targets.argmax(1)
        return np.array([int((live == got).sum()), len(live)])

    def step_record(self, parts: dict[str, torch.Tensor], window: dict, now: float, bad: int) -> dict[str, Any]:
        st = self.state
        stacked = dist.all_reduce(torch.stack([v.detach().float() for v in parts.values()]), self.world, "mean")
        vals = dict(zip(parts, stacked.tolist()))  # the one device sync per logged step
        if not math.isfinite(vals["loss"]):
            self.save()
            raise UserError(f"the loss became {vals['loss']} at epoch {st.epoch} step {st.step - 1}: "
                            f"lower --lr (checkpoint saved for inspection)")
        dt = max(now - window["t"], 1e-9)
        rec = {"kind": "step", "epoch": st.epoch, "step": st.step - 1, "updates": st.updates, **vals,
               "lr": self.optimizer.param_groups[0]["lr"], "img_s": window["n"] / dt,
               "data_wait": window["wait"] / dt}
        if bad:
            rec["bad_files"] = bad
        self.log(rec)
        return rec

    def note_bad(self, bad: tuple[str, ...]) -> None:
        for path in bad:
            if path not in self.bad_seen:
                self.bad_seen.add(path)
                self.console.print(f"[yellow]warning:[/] skipped unreadable image {self.train_index.root / path}")

    def end_epoch(self, epoch: int, stats: dict[str, float], evaluate_now: bool) -> None:
        rec: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                               "bad_files": len(self.bad_seen),
                               **{k: v for k, v in stats.items() if k not in ("images", "seconds")}}
        best = False
        if evaluate_now:
            res = self.evaluate(self.model)
            ev = {"top1": res.top1(), "top5": res.top5(), "eval_img_s": res.img_s}
            ev.update({f"top1_{h}": res.top1(h) for h in res.heads if h != "joint"})
            if self.ema is not None:
                ev["top1_ema"] = self.evaluate(self.ema.module).top1()
            rec.update(ev)
            self.state.last_eval = ev
            best = ev["top1"] > self.state.best_top1
            self.state.best_top1 = max(self.state.best_top1, ev["top1"])
            self.console.print(f"epoch {epoch}: top-1 {ev['top1']:.2f}  top-5 {ev['top5']:.2f}  "
                               f"train {rec['train_img_s']:.0f} img/s  data-wait {rec['data_wait']:.0%}")
        self.log(rec)
        self.save(best=best)

    def evaluate(self, model: torch.nn.Module) -> EvalResult:
        """Each rank evaluates whole eval batches of its own; the counts are summed."""
        rows = dist.eval_rows(len(self.val_index), self.cfg.data.eval_batch_size, self.world)
        res = evaluate(model, self.loaders.eval(self.val_index, rows), self.device, self.amp)
        heads = ["cls", "dist", "joint"] if is_distilled(self.model) else ["joint"]
        return res.summed(heads, lambda t: dist.all_reduce(t, self.world))

    def summarize(self, images: int, seconds: float, wall: float) -> dict[str, Any]:
        ev = self.state.last_eval
        summary = {
            "model": self.cfg.model.name, "distill": self.cfg.distill.mode,
            "params_m": sum(p.numel() for p in self.model.parameters()) / 1e6,
            "epochs": self.cfg.sched.epochs, "top1": ev.get("top1"), "top5": ev.get("top5"),
            **{k: v for k, v in ev.items() if k.startswith("top1_")},
            "best_top1": self.state.best_top1, "train_img_s": images / seconds if seconds else None,
            "eval_img_s": ev.get("eval_img_s"), "wall_s": wall, "train_s_total": self.state.elapsed,
            "bad_files": sorted(self.bad_seen), "device": str(self.device),
            "torch": torch.__version__, "git_commit": git_commit(),
        }
        if self.world.is_main:
            atomic_write_text(json.dumps(summary, indent=2), self.out / "summary.json")
        return summary
