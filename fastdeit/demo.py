"""`fastdeit demo`: the whole story on the embedded synthetic data, on a CPU in minutes.

1. generate the data set (once; it is reused from the cache folder afterwards),
2. train a small convnet teacher from scratch,
3. train a DeiT-tiny student without distillation, and a distilled DeiT-tiny with hard-label
   distillation from that teacher through the distillation token,
4. print one table of every head of every model and write it to summary.json.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fastdeit.config.checks import validate
from fastdeit.config.recipes import recipe
from fastdeit.config.schema import (
    CacheMode,
    Head,
    TeacherTargets,
    TrainConfig,
    apply_overrides,
    choices,
    with_section,
)
from fastdeit.data.synthetic import SyntheticSet, is_complete, write_synthetic
from fastdeit.distill.cache_build import BUILDS
from fastdeit.distill.targets import TARGETS
from fastdeit.pipelines import dali
from fastdeit.report.provenance import git_commit
from fastdeit.report.run_report import write_report
from fastdeit.training.build import load_data
from fastdeit.training.rundir import RunDir
from fastdeit.training.trainer import train

TEACHER = "resnet18"


@dataclass(frozen=True)
class DemoRun:
    folder: str
    model: str
    distill: str = "none"
    targets: TeacherTargets = "live"  # replay caches are built before the run
    sets: tuple[str, ...] = ()  # --set overrides of the demo recipe for this run


def demo_runs() -> list[DemoRun]:
    return [
        # A half-width resnet18: a convnet learns the shapes in a few epochs (about 70% top-1 in
        # 12 epochs, 1.5 minutes on 2 cores); batch 64 and a higher lr suit its BatchNorm layers.
        DemoRun("teacher", TEACHER, sets=("model.width=0.5", "optim.lr=0.016", "run.batch_size=64",
                                          "sched.epochs=12", "run.eval_every=4")),
        DemoRun("deit_tiny", "deit_tiny"),
        DemoRun("deit_tiny_distilled", "deit_tiny_distilled", distill="hard"),
        DemoRun("deit_tiny_distilled_replay", "deit_tiny_distilled", distill="hard", targets="replay"),
        # Label maps at the teacher's training size, 64 px: a 2 x 2 map from its stride-32
        # features. At 128 px (a 4 x 4 map) this teacher is near chance (19% top-1, measured).
        DemoRun("deit_tiny_distilled_labelmap", "deit_tiny_distilled", distill="hard", targets="labelmap"),
    ]


def ensure_data(root: Path, console: Console, synthetic: SyntheticSet | None = None) -> Path:
    synthetic = synthetic or SyntheticSet()
    if is_complete(root, synthetic):
        console.print(f"data: reusing {root}")
        return root
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("generating synthetic data", total=None)
        write_synthetic(root, synthetic, progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"data: wrote {root}")
    return root


def _fresh(folder: Path, console: Console) -> None:
    """A demo run starts from scratch; an earlier demo run in the same folder is replaced,
    but a folder holding anything else is never touched."""
    if folder.exists():
        RunDir(folder).remove()  # refuses a folder holding anything else
        console.print(f"replacing the earlier demo run in {folder}")


def demo_cache(out: Path, targets: TeacherTargets) -> Path:
    """The teacher cache the demo builds for its runs with these targets (shared by them)."""
    return out / f"teacher-{targets}"


def run_config(base: TrainConfig, run: DemoRun, data: Path, out: Path, teacher: Path | None = None,
               cache: Path | None = None) -> TrainConfig:
    """The run's config: the demo recipe, its overrides, and for a distilled run the teacher's
    folder (default OUT/teacher) and, for cached targets, the cache (default demo_cache)."""
    cfg = with_section(base, "data", path=str(data))
    if cfg.data.loader == "auto" and dali.available():
        # DALI's CPU graph beats PIL workers on these small images (no RandAugment in the demo)
        cfg = with_section(cfg, "data", loader="dali")
    cfg = with_section(cfg, "model", name=run.model)
    cfg = with_section(cfg, "run", out=str(out / run.folder))
    cfg = apply_overrides(cfg, list(run.sets))
    if run.distill != "none":
        cache = cache or demo_cache(out, run.targets)
        cfg = with_section(cfg, "distill", mode=run.distill, teacher_ckpt=str(RunDir(teacher or out / "teacher").last),
                           targets=run.targets, teacher_cache=str(cache) if run.targets != "live" else None)
    validate(cfg)
    return cfg


def train_run(cfg: TrainConfig, console: Console, resume: Path | None = None) -> dict[str, Any]:
    """Train one run of the demo (or of the ablation study), building its teacher cache first
    where it reads one that the run does not build itself (replay: a whole cache is kept, a
    killed build resumes). Its summary gains wall_s, the time of this call: the cache's build
    included."""
    t0 = time.perf_counter()
    targets = TARGETS[cfg.distill.targets]
    if targets.cache and not targets.built_by_run:
        BUILDS[targets.cache](cfg, load_data(cfg).train, Path(cfg.distill.teacher_cache), console)
    summary = train(cfg, console, resume=resume)
    return {**summary, "wall_s": time.perf_counter() - t0}


def run_demo(out: Path, data_root: Path, console: Console, base: TrainConfig | None = None,
             runs: list[DemoRun] | None = None, synthetic: SyntheticSet | None = None) -> list[dict[str, Any]]:
    """Train the demo's runs on the synthetic data; returns the table's rows."""
    start = time.perf_counter()
    data = ensure_data(data_root, console, synthetic)
    base = base or recipe("demo")
    rows: list[dict[str, Any]] = []
    summaries = {}
    for targets in choices(CacheMode):  # caches of an earlier demo's teacher: built again
        if (demo_cache(out, targets) / "manifest.json").exists():
            shutil.rmtree(demo_cache(out, targets))
    runs = runs or demo_runs()
    for run in runs:
        cfg = run_config(base, run, data, out)
        _fresh(Path(cfg.run.out), console)
        console.rule(f"{run.folder}: {run.model}, distill {run.distill}, targets {run.targets}")
        summaries[run.folder] = summary = train_run(cfg, console)
        heads = [h for h in choices(Head) if h == "joint" or f"top1_{h}" in summary]
        for head in heads:
            rows.append({
                "run": run.folder, "model": run.model, "distill": run.distill,
                "targets": run.targets if run.distill != "none" else "", "head": head,
                "top1": summary[f"top1_{head}"] if head != "joint" else summary["top1"],
                "top5": summary["top5"] if head == "joint" else None,
                "train_img_s": summary["train_img_s"], "eval_img_s": summary["eval_img_s"],
                "wall_s": summary["wall_s"],
            })
    table = Table(title="fastdeit demo: synthetic data, val split")
    for col in ("model", "distill", "targets", "head", "top-1", "top-5", "train img/s", "eval img/s", "wall time"):
        table.add_column(col, justify="left" if col in ("model", "distill", "targets", "head") else "right",
                         no_wrap=True)
    for r in rows:
        table.add_row(r["model"], r["distill"], r["targets"], r["head"], f"{r['top1']:.1f}",
                      "" if r["top5"] is None else f"{r['top5']:.1f}", f"{r['train_img_s']:.0f}",
                      f"{r['eval_img_s']:.0f}", f"{r['wall_s']:.0f} s")
    Console(width=max(120, Console().width)).print(table)
    total = time.perf_counter() - start
    folder = RunDir(out)  # the demo's folder holds its runs, and their summary as a run's own
    folder.write_summary({"rows": rows, "runs": summaries, "total_wall_s": total, "git_commit": git_commit()})
    page = out / "report.html"  # every run's curves side by side
    write_report([out / run.folder for run in runs], page)
    console.print(f"demo done in {total:.0f} s; table and run summaries in {folder.summary}; curves in {page}")
    return rows
