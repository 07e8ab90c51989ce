"""The training loop. `train` checks the run folder, builds the run's parts (training/build.py) and hands
them to the Trainer, which only loops: epochs of steps, evaluation, checkpoints and metrics,
written through the run folder (training/rundir.py). Only rank 0 writes and prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fastdeit import __version__
from fastdeit.config.schema import Head, TrainConfig, choices, scaled_lr
from fastdeit.distill.sources import agreement
from fastdeit.errors import UserError, differences
from fastdeit.models.factory import is_distilled
from fastdeit.report.provenance import git_commit
from fastdeit.runtime import distributed as dist
from fastdeit.runtime.atomic import atomic_save
from fastdeit.runtime.distributed import SINGLE, World
from fastdeit.runtime.signals import StopSignal, stop_notice
from fastdeit.training.build import RunParts, build_run
from fastdeit.training.evaluate import EvalResult, evaluate
from fastdeit.training.meter import EpochStats, Meter
from fastdeit.training.progress import TrainProgress
from fastdeit.training.rundir import RunDir, read_training_checkpoint, training_checkpoint
from fastdeit.training.sinks import open_sinks

StepHook = Callable[[int], None]  # called with the number of updates after each step


class _Stop(Exception):
    """Raised between steps when a stop was requested (Ctrl-C, SIGTERM)."""


@dataclass
class RunState:
    """Where the run stands: the plan position and what has been measured so far."""

    epoch: int = 0  # the epoch to run next (or being run)
    step: int = 0  # the step within `epoch` to run next
    updates: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    elapsed: float = 0.0  # training seconds of the finished epochs, over all invocations
    last_eval: dict[str, float] = field(default_factory=dict)
    pending: dict[str, Any] | None = None  # the record of an epoch whose evaluation is not done yet

    @classmethod
    def of(cls, saved: dict[str, Any]) -> RunState:
        """The state a checkpoint holds (one written before `pending` could be None holds {})."""
        return cls(**{**saved, "pending": saved.get("pending") or None})


@dataclass(frozen=True)
class EpochResult:
    """What training an epoch (or its rest, when resumed) measured."""

    stats: EpochStats
    target_agreement: float | None  # cached targets vs the live teacher on the first batches; None: not checked

    def record(self) -> dict[str, float]:
        """What the epoch's metrics record holds of it."""
        out = {"train_img_s": self.stats.train_img_s, "data_wait": self.stats.data_wait}
        if self.target_agreement is not None:
            out["target_agreement"] = self.target_agreement
        return out


def train(cfg: TrainConfig, console: Console, world: World = SINGLE, resume: Path | None = None,
          restarted: bool = False, on_step: Sequence[StepHook] = (), stop: StopSignal | None = None,
          again: bool = False) -> dict[str, Any]:
    """A whole run (or one rank of it): train to the last epoch, from `resume` if given, and
    return the summary. `restarted`: torchrun restarted the worker group, the folder is this
    run's own. `stop`: the process's stop signals, already watched (a torchrun worker watches
    them from its start); else they are watched from here on. `again`: `--resume` found no
    checkpoint (RunDir.check_start)."""
    if stop is None:
        with StopSignal(stop_notice(console), cfg.run.requeue_signal) as own:
            return train(cfg, console, world, resume, restarted, on_step, own, again)
    run_dir = RunDir(cfg.run.out)
    with run_dir.hold() if world.is_main else contextlib.nullcontext():
        if not restarted and not run_dir.held_by_launcher():  # the launcher has looked for its workers
            run_dir.check_start(resume, again)
        dist.barrier(world)  # every rank has looked before rank 0 writes
        return Trainer(build_run(cfg, world, console), run_dir, console, stop, on_step).fit(resume)


def _may_change(config: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run may change and says it changed: the optimizer, the schedule, and the
    micro-batches of an update (the same samples, another memory and speed trade)."""
    return {"optim": config["optim"], "sched": config["sched"], "run": {"accum_steps": config["run"]["accum_steps"]}}


class Trainer:
    def __init__(self, parts: RunParts, run_dir: RunDir, console: Console, stop: StopSignal,
                 on_step: Sequence[StepHook] = ()) -> None:
        self.parts = parts
        self.dir = run_dir
        self.console = console
        self.stop = stop
        self.cfg, self.world = parts.cfg, parts.world
        self.on_step = tuple(on_step)  # test hooks (fault injection); none in a normal run
        self.state = RunState()
        self.meter = Meter()
        self.vote = dist.StopVote(self.world)  # every rank stops after the same step
        self.bad_seen: set[str] = set()
        self.sinks = open_sinks(self.cfg.run.log, run_dir.root, self.cfg.to_dict()) if self.world.is_main else []

    def fit(self, resume: Path | None = None) -> dict[str, Any]:
        """Train to the last epoch, evaluate, write summary.json; returns the summary."""
        start = time.perf_counter()
        if resume is not None:
            self.resume(resume)  # a checkpoint it cannot continue from changes nothing on disk
        self.dir.create()
        if resume is not None:
            self.log({"kind": "resume", "epoch": self.state.epoch, "step": self.state.step,
                      "from": str(resume), "world": self.world.size})
        if self.world.is_main:
            self.dir.write_config(self.cfg, self.parts.chosen)
        self.banner()
        images = 0
        seconds = 0.0
        epochs = self.cfg.sched.epochs
        if self.state.pending is not None:  # killed while evaluating: that epoch's evaluation first
            self.evaluate_pending()
        with TrainProgress(self.console, enabled=self.cfg.run.progress and self.world.is_main) as bar:
            try:
                while self.state.epoch < epochs:
                    bar.start_epoch(self.state.epoch, epochs, self.parts.steps_per_epoch, self.state.step)
                    result = self.train_epoch(bar)
                    images += result.stats.images
                    seconds += result.stats.seconds
                    e = self.state.epoch
                    self.state.epoch = e + 1
                    self.state.step = 0
                    evaluate_now = (e + 1) % self.cfg.run.eval_every == 0 or e + 1 == epochs
                    self.end_epoch(e, result, evaluate_now)
            except _Stop as why:
                self.stopped(str(why))
            finally:
                self.vote.close()
                for sink in self.sinks:
                    sink.close()
        if not images and self.dir.summary.exists():  # a finished run resumed: its summary stays whole
            self.console.print(f"{self.dir.root} is already trained to epoch {epochs}: {self.dir.summary} kept")
            return json.loads(self.dir.summary.read_text())
        return self.summarize(images, seconds, time.perf_counter() - start)

    def stopped(self, reason: str) -> None:
        """Every rank agreed to stop after this step: save, log, leave together."""
        self.save()
        record = {"kind": "stop", "epoch": self.state.epoch, "step": self.state.step, "updates": self.state.updates,
                  "reason": reason}
        self.log(record)
        dist.barrier(self.world)  # no rank leaves before the checkpoint is written
        raise self.dir.stop_error(record)

    def train_epoch(self, bar: TrainProgress) -> EpochResult:
        """Run the rest of the current epoch."""
        p = self.parts
        st = self.state
        run = self.cfg.run
        first, agree = st.step, torch.zeros(2, dtype=torch.float64, device=p.device)  # read at the epoch's end
        self.meter.start_epoch()
        live = p.step.teacher.live_check if p.step.teacher is not None else None  # what cached targets meet
        for batch in p.loaders.train(p.data.train, st.epoch, st.step):
            self.meter.data_ready()
            self.note_bad(batch.bad)
            prepared = p.step.prepare(batch)
            if live is not None and st.step - first < self.cfg.distill.agreement_batches:
                agree += agreement(live, prepared.images, prepared.plan, prepared.teacher)
            losses = p.step.update(prepared, st.updates + 1)
            st.updates, st.step = st.updates + 1, st.step + 1
            p.scheduler.step_update(st.updates)
            self.meter.step_done(len(batch.labels) * self.world.size)  # every rank holds an equal shard
            if st.updates % run.log_every == 0 or st.step == p.steps_per_epoch:
                self.log_step(losses, len(batch.bad), bar)
            else:
                bar.update(st.step)
            if reason := self.vote(self.stop.requested):
                raise _Stop(reason)
            if run.ckpt_every and st.updates % run.ckpt_every == 0 and st.step < p.steps_per_epoch:
                with self.meter.paused():
                    self.save()
            for hook in self.on_step:
                hook(st.updates)
            self.meter.asking()  # the next batch is asked for now: what this step did after it is not data wait
        stats = self.meter.end_epoch()
        st.elapsed += stats.seconds
        equal, total = dist.all_reduce(agree, self.world).tolist()
        return EpochResult(stats, equal / total if total else None)

    def log_step(self, losses: dict[str, torch.Tensor], bad: int, bar: TrainProgress) -> None:
        st = self.state
        stacked = dist.all_reduce(torch.stack([v.detach().float() for v in losses.values()]), self.world, "mean")
        vals = dict(zip(losses, stacked.tolist()))  # the one device sync per logged step
        if not math.isfinite(vals["loss"]):
            self.diverged(f"the loss became {vals['loss']} at epoch {st.epoch} step {st.step - 1}")
        img_s, wait = self.meter.window()
        rec = {"kind": "step", "epoch": st.epoch, "step": st.step - 1, "updates": st.updates, **vals,
               "lr": self.parts.optimizer.param_groups[0]["lr"], "img_s": img_s, "data_wait": wait}
        if bad:
            rec["bad_files"] = bad
        self.log(rec)
        bar.update(st.step, rec["loss"], img_s)

    def end_epoch(self, epoch: int, result: EpochResult, evaluate_now: bool) -> None:
        """Save the epoch's work, then evaluate (an evaluation that fails loses nothing), log,
        and save again with the evaluation in the state (and as the best checkpoint). The
        epoch's record waits in the first save (`RunState.pending`): a run killed while
        evaluating evaluates that epoch first when resumed."""
        rec: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "lr": self.parts.optimizer.param_groups[0]["lr"],
                               "bad_files": len(self.bad_seen), **result.record()}
        if evaluate_now:
            self.state.pending = rec
        self.save()
        if evaluate_now:
            self.evaluate_pending()
        else:
            self.log(rec)

    def evaluate_pending(self) -> None:
        """Evaluate the epoch whose record waits in the state; log it; save."""
        rec = dict(self.state.pending or {})
        res = self.evaluate(self.parts.model)
        ev = {"top1": res.top1(), "top5": res.top5(), "eval_img_s": res.img_s}
        ev.update({f"top1_{h}": res.top1(h) for h in res.heads if h != "joint"})
        if res.bad:  # left out of top-1 and top-5
            ev["eval_unreadable"] = res.bad
            self.console.print(f"warning: {res.bad} val images could not be decoded and were left out")
        if self.parts.ema is not None:
            ev["top1_ema"] = self.evaluate(self.parts.ema.module).top1()
        rec.update(ev)
        self.state.last_eval = ev
        self.state.pending = None
        best = ev["top1"] > self.state.best_top1
        self.state.best_top1 = max(self.state.best_top1, ev["top1"])
        self.console.print(f"epoch {rec['epoch']}: top-1 {ev['top1']:.2f}  top-5 {ev['top5']:.2f}  "
                           f"train {rec.get('train_img_s') or 0:.0f} img/s  data-wait {rec.get('data_wait', 0):.0%}")
        self.log(rec)
        self.save(best=best)

    def evaluate(self, model: torch.nn.Module) -> EvalResult:
        """Each rank evaluates whole eval batches of its own; the counts are summed."""
        p = self.parts
        rows = dist.eval_rows(len(p.data.val), self.cfg.data.eval_batch_size, self.world)
        res = evaluate(model, p.loaders.eval(p.data.val, rows), p.device, p.amp)
        heads = [h for h in choices(Head) if h == "joint" or is_distilled(p.model)]
        return res.summed(heads, lambda t: dist.all_reduce(t, self.world))

    # --- what the run folder receives ---------------------------------------------------

    def banner(self) -> None:
        c, p = self.cfg, self.parts
        self.console.print(f"{c.model.name} on {len(p.data.train)} images, {len(p.data.classes)} classes, "
                           f"{p.device}, batch {c.run.batch_size}, {p.steps_per_epoch} steps/epoch, "
                           f"lr {scaled_lr(c):.2e}, distill {c.distill.mode}"
                           + (f", {self.world.size} ranks" if self.world.distributed else ""))
        self.console.print("; ".join(f"{k}: {v}" for k, v in p.chosen.items()))

    def note_bad(self, bad: tuple[str, ...]) -> None:
        for path in bad:
            if path not in self.bad_seen:
                self.bad_seen.add(path)
                self.console.print(f"warning: skipped unreadable image {self.parts.data.train.root / path}",
                                   markup=False)

    def log(self, record: dict[str, Any]) -> None:
        if self.world.is_main:
            self.dir.log(record)
            for sink in self.sinks:
                sink.write(record)

    def components(self) -> dict[str, Any]:
        """The parts whose state a checkpoint holds (None where the run has none)."""
        p = self.parts
        return {"model": p.model, "optimizer": p.optimizer, "scheduler": p.scheduler, "scaler": p.scaler,
                "ema": p.ema}

    def checkpoint(self) -> dict[str, Any]:
        state = {**asdict(self.state), "elapsed": self.state.elapsed + self.meter.seconds()}
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.parts.device.type == "cuda" else []}
        parts = {k: c.state_dict() if c is not None else {} for k, c in self.components().items()}
        return training_checkpoint(self.cfg, self.parts.data.classes, self.parts.data.fingerprint, parts, state, rng)

    def save(self, best: bool = False) -> None:
        """checkpoint-last.pt (and -best.pt); weights that are no longer finite never replace a
        good checkpoint."""
        if not self.world.is_main:
            return
        params = [p.detach() for p in self.parts.model.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # one sync per save
            self.diverged(f"the weights stopped being finite by epoch {self.state.epoch} step {self.state.step}")
        self.dir.save(self.checkpoint(), best=best)

    def diverged(self, what: str) -> None:
        """Training diverged: its state goes to checkpoint-diverged.pt for inspection, the last
        good checkpoint stays as it is."""
        if self.world.is_main:
            atomic_save(self.checkpoint(), self.dir.diverged)
        kept = f"; {self.dir.last} (the last good state) is kept" if self.dir.last.exists() else ""
        raise UserError(f"{what}: lower optim.lr (the diverged state is in {self.dir.diverged}{kept})")

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint. Its optimizer moments, EMA and scaler are restored; the
        lr schedule and the optimizer's settings follow this run's config (a changed
        optim.lr or sched.epochs applies from the next update, and is said)."""
        p = self.parts
        ck = read_training_checkpoint(path, self.cfg, p.data.classes, p.data.fingerprint)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in p.optimizer.param_groups]
        for name, component in self.components().items():
            if component is not None and ck[name] and name != "scheduler":
                component.load_state_dict(ck[name])
        for group, fresh in zip(p.optimizer.param_groups, settings):
            group.update(fresh)
        self.state = RunState.of(ck["state"])
        p.scheduler.step_update(self.state.updates)
        old, now = TrainConfig.from_dict(ck["config"]).to_dict(), self.cfg.to_dict()
        changed = differences(_may_change(old), _may_change(now))
        if changed:
            self.console.print("resuming with a changed schedule: " + ", ".join(
                f"{k} {a} -> {b}" for k, a, b in changed) + f" (applies from update {self.state.updates + 1})",
                markup=False)
        torch.set_rng_state(ck["rng"]["torch"])
        if p.device.type == "cuda" and ck["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])

    def run_img_s(self) -> float | None:
        """img/s over every invocation (for one that trained nothing itself)."""
        st = self.state
        return st.updates * self.cfg.run.batch_size / st.elapsed if st.elapsed else None

    def summarize(self, images: int, seconds: float, wall: float) -> dict[str, Any]:
        ev, c = self.state.last_eval, self.cfg
        summary = {
            "model": c.model.name, "distill": c.distill.mode,
            "params_m": sum(p.numel() for p in self.parts.model.parameters()) / 1e6,
            "epochs": c.sched.epochs, "top1": ev.get("top1"), "top5": ev.get("top5"),
            **{k: v for k, v in ev.items() if k.startswith("top1_")},
            "best_top1": self.state.best_top1, "train_img_s": images / seconds if seconds else self.run_img_s(),
            "eval_img_s": ev.get("eval_img_s"), "wall_s": wall, "train_s_total": self.state.elapsed,
            "bad_files": sorted(self.bad_seen), "device": str(self.parts.device),
            "fastdeit": __version__, "torch": torch.__version__, "git_commit": git_commit(),
        }
        if self.world.is_main:
            self.dir.write_summary(summary)
        return summary
