"""The host's share of a training step: the real Trainer loop around a null step, per target source.

    python benchmarks/loop.py [--batch 1024] [--steps 30] [--targets none,live,replay,labelmap]
                              [--sizes 1,4] [--log-every 1,50] [--out FILE]

What runs is `Trainer.train_epoch` of a run built by `build_run` as `fastdeit train` builds it:
the plan's rows, the target source (none; live with a null teacher; replay from a cache and
label maps, both built first by the real builders), the tail, the scheduler, the meter, the
metrics line written every `log_every` steps (with its device sync and its all-reduce), the
stop vote and the progress bar. Only what a GPU would do is made nearly free: the batches are
decoded once beforehand (the loader's work is measured by loader.py), the images are 8 px (the
tail's arithmetic is then small, and still counted), the student is a one-block ViT of width
8 and the live teacher returns zeros. The student's update is timed apart: the host overhead
is the step's time without it (an upper bound: on a GPU the tail runs on the device), and
the host-only share leaves out what a GPU would run as kernels too (the tail's and the
targets' arithmetic), whose launches the operator count of a step's prepare measures.

Each size multiplies the data set (and with it the epoch's length and the caches' rows) at the
same number of timed steps: what the loop costs must not grow with them. The profile times the
loop's parts (wrapped in place; the wrappers' own cost is in the total).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import timm
import torch
from rich.console import Console
from rich.table import Table
from startup import make_tree  # a sibling script
from torch.utils._python_dispatch import TorchDispatchMode

from fastdeit.api import build_train_config
from fastdeit.distill.cache_build import build_labelmap, build_replay
from fastdeit.pipelines import tail as tail_module
from fastdeit.report.provenance import measured_on, write_results
from fastdeit.runtime.atomic import atomic_save
from fastdeit.runtime.distributed import SINGLE
from fastdeit.training import step as step_module
from fastdeit.training.build import build_run, load_data
from fastdeit.training.progress import TrainProgress
from fastdeit.training.rundir import RunDir
from fastdeit.training.trainer import Trainer

PX = 8  # the images' size: the tail's arithmetic stays small
CLASSES = 100
TINY_STUDENT = ["model.depth=1", "model.embed_dim=8", "model.num_heads=1", f"model.patch_size={PX}",
                "model.drop_path=0.0"]


class NullTeacher(torch.nn.Module):
    """A live teacher that costs nothing: zeros logits for the batch."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.new_zeros(len(images), self.classes)


class Profile:
    """Seconds per named part, gathered by wrapping callables in place."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


class OpCount(TorchDispatchMode):
    """Counts the operator calls made under it: on a GPU each is a kernel launch or a view the
    host pays for, whatever the device does, so the count is the host's share anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class TimedSource:
    """A teacher source whose `inputs` (host: the cache's rows) and call (device: the targets)
    are timed apart; everything else is the source's own."""

    def __init__(self, source: Any, profile: Profile) -> None:
        self._source = source
        self.inputs = profile.wrap("targets: host (cache rows, pooling inputs)", source.inputs)
        self._call = profile.wrap("targets: device (teacher, lookup, pooling)", source.__call__)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def config(data: Path, work: Path, batch: int, targets: str, log_every: int, teacher: Path):
    sets = [f"data.img_size={PX}", "data.workers=0", "data.loader=torch", f"run.batch_size={batch}",
            f"run.log_every={log_every}", "run.progress=false", "run.device=cpu", "run.ckpt_every=0",
            f"run.out={work / 'run'}", "sched.epochs=1", "sched.warmup_epochs=0", *TINY_STUDENT]
    if targets != "none":
        sets += ["distill.mode=hard", "distill.teacher=resnet10t", f"distill.teacher_ckpt={teacher}",
                 f"distill.targets={targets}", "distill.agreement_batches=0"]
        if targets != "live":
            sets.append(f"distill.teacher_cache={work / targets}")
    return build_train_config("deit", {"data.path": str(data), "model.name": "deit_tiny_distilled"}, sets)


def ready_batches(parts, steps: int) -> list:
    """The first `steps` batches of epoch 0, decoded once by the run's own loader."""
    batches = []
    for batch in parts.loaders.train(parts.data.train, 0, 0):
        batches.append(batch)
        if len(batches) == steps:
            return batches
    raise SystemExit(f"the data set holds {len(batches)} batches of epoch 0, {steps} are needed")


def measure(cfg, steps: int, repeats: int, quiet: Console, tail: str = "cpu") -> dict[str, Any]:
    """ms per step of the loop (median and mean over `repeats` passes over the same ready
    batches) and its profile by part, summed over the passes; the host shares are of the mean.
    `tail` "gpu": the tail erases and mixes as on a GPU (one vectorised pass each: the op
    sequence whose launches a GPU's host pays), "cpu": as on a CPU (a row and its partner at a time:
    what a CPU run pays)."""
    parts = build_run(cfg, SINGLE, quiet)
    if cfg.distill.mode != "none" and cfg.distill.targets == "live":
        parts.step.teacher.teacher = NullTeacher(len(parts.data.classes))
    parts.loaders.tail = None  # uint8 batches: the tail is timed where a GPU run has it, in the step
    batches = ready_batches(parts, steps)
    parts.loaders.train = lambda index, epoch, step: iter(batches[step:])
    profile = Profile()
    step = parts.step
    if step.teacher is not None:
        step.teacher = TimedSource(step.teacher, profile)
    step.prepare = profile.wrap("prepare (to the device, tail, targets)", step.prepare)
    step.update = profile.wrap("update (the null student: forward, loss, backward, AdamW)", step.update)
    originals = {name: getattr(step_module, name) for name in ("tail_inputs", "apply_tail", "to_device")}
    for name, fn in originals.items():
        setattr(step_module, name, profile.wrap(f"prepare: {name}", fn))
    images = tail_module._images
    if tail == "gpu":  # the tail's GPU branch, on the CPU
        tail_module._images = tail_module.images_whole
    parts.scheduler.step_update = profile.wrap("scheduler", parts.scheduler.step_update)
    run_dir = RunDir(cfg.run.out)
    run_dir.create()
    trainer = Trainer(parts, run_dir, quiet, SimpleNamespace(requested=None))
    trainer.log_step = profile.wrap("log_step (sync, all-reduce, metrics line)", trainer.log_step)
    trainer.vote = profile.wrap("stop vote", trainer.vote)
    per_step = []
    try:
        with TrainProgress(quiet, enabled=False) as bar:
            for k in range(repeats + 1):  # pass 0 warms up (lazy state, first calls), untimed
                if k == 1:
                    profile.seconds.clear()
                trainer.state.step = 0
                bar.start_epoch(0, 1, parts.steps_per_epoch, 0)
                t0 = time.perf_counter()
                trainer.train_epoch(bar)
                per_step.append((time.perf_counter() - t0) / steps)
        seconds = dict(profile.seconds)
        with OpCount() as ops:  # one more prepare, untimed
            parts.step.prepare(batches[0])
    finally:
        for name, fn in originals.items():  # the module's own functions again
            setattr(step_module, name, fn)
        tail_module._images = images
    per_step = per_step[1:]
    # The parts are sums over the passes: the host shares take the mean pass as well (a median
    # less mean parts could fall below zero on a noisy pass).
    total = statistics.fmean(per_step)
    update = seconds["update (the null student: forward, loss, backward, AdamW)"] / (steps * repeats)
    # What a GPU would run as kernels: the tail's arithmetic and the targets' (teacher, lookup, pooling).
    kernels = ("prepare: apply_tail", "targets: device (teacher, lookup, pooling)")
    device_side = sum(seconds.get(k, 0.0) for k in kernels) / (steps * repeats)
    return {"ms_per_step": statistics.median(per_step) * 1e3, "ms_per_step_mean": total * 1e3,
            "ms_per_step_runs": [t * 1e3 for t in per_step],
            "update_ms": update * 1e3, "host_ms_per_step": (total - update) * 1e3,
            "prepare_operator_calls": ops.calls,
            "host_only_ms_per_step": (total - update - device_side) * 1e3,
            "host_ms_per_1000_images": (total - update) * 1e3 * 1000 / cfg.run.batch_size,
            "profile_ms_per_step": {k: v * 1e3 / (steps * repeats) for k, v in
                                    sorted(seconds.items(), key=lambda kv: -kv[1])},
            "train_images": len(parts.data.train), "steps_per_epoch": parts.steps_per_epoch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024, help="the global batch")
    p.add_argument("--steps", type=int, default=30, help="timed steps per pass (the data set holds size x this)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the same batches; the median is kept")
    p.add_argument("--targets", default="none,live,replay,labelmap")
    p.add_argument("--sizes", default="1,4", help="comma-separated multiples of the data set (and the caches)")
    p.add_argument("--log-every", default="1,50", help="comma-separated logging intervals, in steps")
    p.add_argument("--tail", default="gpu,cpu",
                   help="comma-separated: the tail as on a GPU (a pass per stage) or as on a CPU (by pairs)")
    p.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    p.add_argument("--root", type=Path, default=None, help="where the data sets go (default: a temp folder)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    # The loop's host work is Python and tiny tensor ops: more intra-op threads add only their
    # barriers, which cost milliseconds per op on a busy machine.
    torch.set_num_threads(a.threads)
    console = Console(stderr=True)
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    root = a.root or Path(tempfile.gettempdir()) / "fastdeit-bench-loop"
    work = Path(tempfile.mkdtemp(prefix="fastdeit-loop-"))
    teacher = work / "teacher.pt"
    torch.manual_seed(0)
    atomic_save(timm.create_model("resnet10t", num_classes=CLASSES).state_dict(), teacher)
    targets = a.targets.split(",")
    rows = []
    report = {"benchmark": "loop", **measured_on(torch.device("cpu")),
              "settings": {"batch": a.batch, "steps": a.steps, "repeats": a.repeats, "img_size": PX,
                           "threads": a.threads,
                           "classes": CLASSES, "student": "deit_tiny_distilled, " + ", ".join(TINY_STUDENT),
                           "teacher": "live: zeros (NullTeacher); caches built by resnet10t of random weights"},
              "command": " ".join(["loop.py", *(argv if argv is not None else sys.argv[1:])]), "rows": rows}
    for size in (int(v) for v in a.sizes.split(",")):
        files = size * a.batch * a.steps
        data = make_tree(root / f"tree-{files}", files, distinct=64, classes=CLASSES, px=(PX, 2 * PX))
        for kind in targets:
            for log_every, tail in ((n, t) for n in map(int, a.log_every.split(",")) for t in a.tail.split(",")):
                place = work / f"{size}-{kind}"
                cfg = config(data, place, a.batch, kind, log_every, teacher)
                if kind in ("replay", "labelmap") and not (place / kind).exists():
                    console.print(f"size x{size}: building the {kind} cache of {files:,} images ...")
                    build = build_replay if kind == "replay" else build_labelmap
                    args = (cfg, load_data(cfg).train, place / kind) + ((1,) if kind == "replay" else ())
                    build(*args, quiet)
                console.print(f"size x{size} ({files:,} images): {kind}, a metrics line every {log_every} steps, "
                              f"the {tail}'s tail ...")
                rows.append({"size": size, "targets": kind, "log_every": log_every, "tail": tail,
                             **measure(cfg, a.steps, a.repeats, quiet, tail)})
                write_results(report, a.out)  # a run cut short keeps what it measured
    print_rows(rows, f"the loop's host ms per step at batch {a.batch}, {report['device']}")
    write_results(report, a.out)
    return 0


def print_rows(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("size", "targets", "log every", "tail", "images", "step ms", "update ms", "host ms", "host ms / 1k img",
                "host-only ms", "prepare ops", "top parts (ms)"):
        table.add_column(col, justify="left" if col in ("targets", "top parts (ms)") else "right")
    for r in rows:
        top = ", ".join(f"{k.split(' (')[0]} {v:.2f}" for k, v in list(r["profile_ms_per_step"].items())[:4])
        table.add_row(f"x{r['size']}", r["targets"], str(r["log_every"]), r["tail"], f"{r['train_images']:,}",
                      f"{r['ms_per_step']:.2f}", f"{r['update_ms']:.2f}", f"{r['host_ms_per_step']:.2f}",
                      f"{r['host_ms_per_1000_images']:.2f}", f"{r['host_only_ms_per_step']:.2f}",
                      str(r["prepare_operator_calls"]), top)
    Console(width=200).print(table)


if __name__ == "__main__":
    sys.exit(main())
