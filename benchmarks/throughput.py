"""Throughput of the training step, in images per second, on whatever device is there.

Section `distill`: the same student, batch and device trained with --distill none, and with
hard distillation whose targets come from the live teacher, a replay cache and label maps.
Batches are decoded once beforehand, so the table shows what the target source costs the
step (the tail, the targets, forward, loss, backward and the optimizer step are timed).

    python benchmarks/throughput.py --section distill --device cpu
    python benchmarks/throughput.py --section distill --device cuda --student deit_small_distilled \\
        --teacher regnety_160 --img-size 224 --batch-size 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from fastdeit.caching import build_labelmap, build_replay, open_reader_source
from fastdeit.config import apply_overrides, recipe, with_section
from fastdeit.data.folder import scan_split
from fastdeit.data.synthetic import SyntheticSpec, is_complete, write_synthetic
from fastdeit.distill import DistillationLoss
from fastdeit.engine import Stepper, amp_dtype
from fastdeit.loaders import Loaders
from fastdeit.models import build_model
from fastdeit.pipelines.tail import apply_tail
from fastdeit.plan import PlanSpec
from fastdeit.targets import LiveTeacher
from fastdeit.teacher_cache import CacheReader


def forward_gmacs(model: torch.nn.Module, size: int, device: torch.device) -> float:
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size, device=device))
    model.train(was)
    return counter.get_total_flops() / 2 / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def distill_section(a: argparse.Namespace, device: torch.device, console: Console) -> dict:
    data = a.data or Path(tempfile.gettempdir()) / f"fastdeit-bench-distill-{a.img_size}"
    if a.data is None:
        spec = SyntheticSpec(classes=10, train_per_class=max(1, a.batch_size * (a.steps + a.warmup) // 10) + 1,
                             val_per_class=1, min_size=a.img_size, max_size=int(a.img_size * 1.5))
        if not is_complete(data, spec):
            write_synthetic(data, spec)
    index = scan_split(data, "train")
    classes = len(index.classes)
    work = Path(tempfile.mkdtemp(prefix="fastdeit-bench-"))
    teacher_ckpt = work / "teacher.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model(a.teacher, num_classes=classes).state_dict(), teacher_ckpt)
    cfg = recipe("deit")
    cfg = apply_overrides(cfg, [f"aug.mix_group={min(64, a.batch_size)}", "aug.repeated_aug=1", "data.workers=0",
                                f"data.eval_batch_size={a.batch_size}", "sched.epochs=1"])
    cfg = with_section(cfg, "data", path=str(data), img_size=a.img_size)
    cfg = with_section(cfg, "run", batch_size=a.batch_size, device=device.type, out=str(work / "run"))
    cfg = with_section(cfg, "model", name=a.student, drop_path=0.0)
    cfg = with_section(cfg, "distill", mode="hard", teacher=a.teacher, teacher_ckpt=str(teacher_ckpt))
    spec, amp = PlanSpec.from_config(cfg), amp_dtype(cfg.run.amp, device)
    n_batches = a.warmup + a.steps
    batches = []
    for batch in Loaders("torch", cfg.data, spec, device).train(index, 0, 0):
        batches.append(batch)
        if len(batches) == n_batches:
            break
    if len(batches) < n_batches:
        raise SystemExit(f"the data set holds {len(batches)} batches, {n_batches} are needed")
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    build_replay(cfg, index, work / "replay", 1, quiet)
    build_labelmap(cfg, index, work / "labelmap", quiet)
    teacher = LiveTeacher(timm.create_model(a.teacher, num_classes=classes).to(device).eval(), amp)
    teacher.teacher.load_state_dict(torch.load(teacher_ckpt, weights_only=True))
    sources = {"none": None, "live": teacher,
               "replay": open_reader_source(cfg, index, CacheReader(work / "replay")),
               "labelmap": open_reader_source(cfg, index, CacheReader(work / "labelmap"))}
    student = build_model(cfg.model, classes, a.img_size).to(device)
    macs = {"student": forward_gmacs(student, a.img_size, device),
            "teacher": forward_gmacs(teacher.teacher, a.img_size, device)}
    state = {k: v.clone() for k, v in student.state_dict().items()}
    runs: dict[str, list[float]] = {name: [] for name in sources}
    for r in range(a.repeats):  # rounds interleave the sources, so drifts hit them alike
        for name, source in sources.items():
            student.load_state_dict(state)
            opt = torch.optim.AdamW(student.parameters(), lr=1e-4,
                                    **({"fused": True} if device.type == "cuda" else {}))
            stepper = Stepper(student, opt, DistillationLoss("none" if source is None else "hard"), amp)
            console.print(f"round {r + 1}/{a.repeats}: {name} ...")
            for k, batch in enumerate(batches):
                if k == a.warmup:
                    sync(device)
                    t0 = time.perf_counter()
                x = apply_tail(batch.images.to(device), batch.labels, batch.plan, classes, cfg.aug.smoothing,
                               amp or torch.float32)
                targets = None if source is None else source(x.images, batch.plan)
                stepper.step(x.images, x.targets, targets, k + 1)
            sync(device)
            runs[name].append(a.steps * a.batch_size / (time.perf_counter() - t0))
    rates = {k: float(np.median(v)) for k, v in runs.items()}
    return {"student": a.student, "teacher": a.teacher, "img_size": a.img_size, "batch_size": a.batch_size,
            "forward_gmacs": macs, "teacher_to_student_forward": macs["teacher"] / macs["student"],
            "img_per_s": rates, "img_per_s_runs": runs,
            "step_cost_vs_none": {k: rates["none"] / v - 1.0 for k, v in rates.items() if k != "none"}}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", default="distill", choices=["distill"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", type=Path, default=None, help="ImageFolder root (default: synthetic images)")
    p.add_argument("--student", default="deit_tiny_distilled")
    # On a CPU: resnet50 at 112 px costs 3.9x the forward of DeiT-tiny at 112 px, about what
    # RegNetY-16GF costs DeiT-S at 224 (3.75x).
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    console = Console(stderr=True)
    result = distill_section(a, device, console)
    report = {"benchmark": "throughput", "section": a.section, "device": device_name(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                           "numpy": np.__version__},
              "settings": {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
                           "threads": torch.get_num_threads()},
              "distill": result,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    table = Table(title=f"distillation targets: {a.student} <- {a.teacher} "
                        f"({result['teacher_to_student_forward']:.2f}x its forward), {a.img_size} px, "
                        f"batch {a.batch_size}, {report['device']}")
    for col in ("targets", "train img/s", "vs none", "step cost over none"):
        table.add_column(col, justify="left" if col == "targets" else "right")
    rates = result["img_per_s"]
    for name, v in rates.items():
        cost = result["step_cost_vs_none"].get(name)
        table.add_row(name, f"{v:.1f}", f"{v / rates['none']:.2f}x", "" if cost is None else f"{cost:+.1%}")
    Console().print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))
        console.print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
