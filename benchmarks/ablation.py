"""The DeiT paper's comparisons as a study with error bars, on the embedded synthetic data.

    python benchmarks/ablation.py [--quick] [--seeds N] [--out DIR] [--results FILE]

Questions, each answered by arms (one training configuration) run once per seed:
  distillation  none / soft / hard with the live convnet teacher, hard with replayed and with
                label-map targets; the cls, dist and joint heads of every distilled arm
  teacher       hard distillation from a transformer teacher vs a convnet teacher trained to
                a similar accuracy (and the full convnet teacher, for scale)
  scarcity      10%, 30% and 100% of the training images, without and with distillation, at
                the same number of updates (epochs, warm-up and eval interval x 100/fraction)
Teachers are trained once (seed 0); students once per seed (run.seed). Every run is a normal
fastdeit run folder under DIR/runs; a run whose folder has its summary is skipped, a run cut
short resumes from its last checkpoint, so stopping and restarting the study loses nothing. A
record made with other settings than the study's now is refused, never mixed in.
Writes FILE (default DIR/ablation.json: every run, and mean ± std over seeds per arm and
head) and one figure per question beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fastdeit.build import load_data
from fastdeit.caching import build_replay
from fastdeit.config import TrainConfig, apply_overrides, recipe
from fastdeit.data.synthetic import SyntheticSet
from fastdeit.demo import DemoRun, ensure_data, run_config
from fastdeit.errors import UserError, differences
from fastdeit.provenance import measured_on, write_report
from fastdeit.rundir import RunDir
from fastdeit.trainer import train

HEADS = ("cls", "dist", "joint")
CONVNET = ("model.width=0.5", "optim.lr=0.016", "run.batch_size=64")  # the demo's teacher recipe


@dataclass(frozen=True)
class Scale:
    """How big the study is: the data set, the epochs of each teacher and of the students."""

    data: SyntheticSet
    student_epochs: int
    convnet_epochs: int
    matched_epochs: int  # a convnet stopped early, to match the transformer teacher's accuracy
    transformer_epochs: int
    sets: tuple[str, ...] = ()  # overrides for every run (the test's tiny study)
    vit_sets: tuple[str, ...] = ()  # and for every transformer (students, the transformer teacher)


FULL = Scale(SyntheticSet(), student_epochs=10, convnet_epochs=12, matched_epochs=5, transformer_epochs=20)
QUICK = Scale(SyntheticSet(train_per_class=100, val_per_class=30), student_epochs=3, convnet_epochs=4,
              matched_epochs=1, transformer_epochs=6)
TINY = Scale(SyntheticSet(train_per_class=10, val_per_class=4, min_size=32, max_size=40), student_epochs=1,
             convnet_epochs=1, matched_epochs=1, transformer_epochs=1,
             sets=("data.img_size=32", "aug.mix_group=4", "run.batch_size=8", "data.workers=1"),
             vit_sets=("model.patch_size=8", "model.depth=2", "model.embed_dim=32", "model.num_heads=2"))


@dataclass(frozen=True)
class Arm:
    name: str
    question: str
    model: str = "deit_tiny_distilled"
    distill: str = "none"
    targets: str = "live"
    teacher: str = "convnet"
    fraction: int = 100  # percent of the training images
    sets: tuple[str, ...] = ()
    seeds: int = 0  # at most this many seeds (0: all)


ARMS = (
    Arm("none", "distillation", model="deit_tiny"),
    # The paper's soft-distillation setting: tau 3, alpha 0.1.
    Arm("soft", "distillation", distill="soft", sets=("distill.tau=3.0", "distill.alpha=0.1")),
    Arm("hard", "distillation", distill="hard"),
    # Replayed targets train bit for bit as the live teacher (tests/test_ablation.py checks it at
    # the tiny scale, the demo at full size): one seed shows it, more would repeat it.
    Arm("hard-replay", "distillation", distill="hard", targets="replay", seeds=1),
    Arm("hard-labelmap", "distillation", distill="hard", targets="labelmap"),
    Arm("hard-convnet-matched", "teacher", distill="hard", teacher="convnet-matched"),
    Arm("hard-transformer", "teacher", distill="hard", teacher="transformer"),
    *(Arm(f"{kind}-{pct}pct", "scarcity", model="deit_tiny" if kind == "none" else "deit_tiny_distilled",
          distill=kind, fraction=pct) for pct in (10, 30) for kind in ("none", "hard")),
)


def teachers(scale: Scale) -> dict[str, DemoRun]:
    return {
        "convnet": DemoRun("teachers/convnet", "resnet18", sets=(*CONVNET, f"sched.epochs={scale.convnet_epochs}")),
        "convnet-matched": DemoRun("teachers/convnet-matched", "resnet18",
                                   sets=(*CONVNET, f"sched.epochs={scale.matched_epochs}")),
        "transformer": DemoRun("teachers/transformer", "deit_tiny",
                               sets=(*scale.vit_sets, f"sched.epochs={scale.transformer_epochs}")),
    }


def subset(full: Path, out: Path, pct: int) -> Path:
    """`pct`% of each class's training images (the first ones by name; the generator draws
    them independently, so that is a random sample) and the whole val split, as hard links."""
    if pct == 100:
        return full
    root = out / f"train-{pct}pct"
    for split in ("train", "val"):
        for cls in sorted(p for p in (full / split).iterdir() if p.is_dir()):
            files = sorted(cls.iterdir())
            keep = files if split == "val" else files[:max(1, round(len(files) * pct / 100))]
            (root / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in keep:
                link = root / split / cls.name / f.name
                if not link.exists():
                    os.link(f, link)
    return root


def settings(cfg: TrainConfig) -> dict[str, Any]:
    """What decides a run's numbers: its config without the places of its files (the study's
    --out may move) and the knobs that do not change what is trained."""
    d = cfg.to_dict()
    for section, key in (("run", "out"), ("run", "progress"), ("data", "path"), ("data", "workers"),
                         ("distill", "teacher"), ("distill", "teacher_cache")):
        d[section].pop(key, None)
    return json.loads(json.dumps(d))  # as a record holds it (tuples become lists)


def check_record(record: Path, rec: dict[str, Any], cfg: TrainConfig) -> None:
    """A record counts only for the settings it was trained with. Records older than this
    check carry none: their run folder's config.json says what ran."""
    then = rec.get("settings")
    if then is None and RunDir(cfg.run.out).config.is_file():
        then = settings(TrainConfig.from_dict(json.loads(RunDir(cfg.run.out).config.read_text())))
    if then is not None and (what := differences(then, settings(cfg))):
        said = "; ".join(f"{k} {a} then, {b} now" for k, a, b in what[:3])
        raise UserError(f"{record} was trained with other settings ({said}): delete it and {cfg.run.out} to "
                        f"train it again, or pick another --out")


def run(cfg: TrainConfig, record: Path, console: Console, extra: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume, or skip) one run; its record: the summary's accuracies, img/s, the
    wall time of the work done for it (with its replay cache, where it built one) and the
    settings it was trained with."""
    if record.exists():
        rec = json.loads(record.read_text())
        check_record(record, rec, cfg)
        return rec
    folder = RunDir(cfg.run.out)
    if not folder.last.exists():  # stopped before its first checkpoint: start it over
        folder.remove()
    t0 = time.perf_counter()
    if cfg.distill.targets == "replay" and not (Path(cfg.distill.teacher_cache) / "manifest.json").exists():
        build_replay(cfg, load_data(cfg).train, Path(cfg.distill.teacher_cache), cfg.sched.epochs, console)
    summary = train(cfg, console, resume=folder.last if folder.last.exists() else None)
    rec = {**extra, "top1_joint": summary["top1"], "top5": summary["top5"], "train_img_s": summary["train_img_s"],
           "wall_s": time.perf_counter() - t0, "epochs": cfg.sched.epochs, "settings": settings(cfg)}
    rec.update({f"top1_{h}": summary[f"top1_{h}"] for h in ("cls", "dist") if f"top1_{h}" in summary})
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(rec, indent=1))
    return rec


def base_config(scale: Scale, extra_sets: list[str]) -> TrainConfig:
    cfg = recipe("demo")
    cfg = apply_overrides(cfg, [f"sched.epochs={scale.student_epochs}", *scale.sets, *extra_sets])
    return replace(cfg, run=replace(cfg.run, progress=False))


def same_updates(cfg: TrainConfig, pct: int) -> list[str]:
    """Overrides that give a run on `pct`% of the images as many updates as one on all of them,
    with its warm-up and evaluations at the same points of training: a scarce-data arm then
    measures what fewer distinct images cost, not a shorter schedule."""
    if pct == 100:
        return []
    k = 100 / pct
    return [f"sched.epochs={round(cfg.sched.epochs * k)}", f"sched.warmup_epochs={cfg.sched.warmup_epochs * k:g}",
            f"run.eval_every={max(1, round(cfg.run.eval_every * k))}"]


def study(scale: Scale, seeds: int, out: Path, arms: tuple[Arm, ...], sets: list[str],
          console: Console) -> dict[str, Any]:
    data = ensure_data(out / "data" / "full", console, scale.data)
    base = base_config(scale, sets)
    needed = {"convnet"} | {a.teacher for a in arms if a.distill != "none"}
    teacher_runs = {k: v for k, v in teachers(scale).items() if k in needed}
    records: dict[str, Any] = {"teachers": {}, "runs": []}
    for name, t in teacher_runs.items():
        console.rule(f"teacher {name}: {t.model}")
        cfg = run_config(base, t, data, out)
        records["teachers"][name] = run(cfg, out / "records" / f"teacher-{name}.json", console, {"teacher": name})
    plan = [(seed, arm) for seed in range(seeds) for arm in arms  # seed by seed: a cut study has whole seeds
            if not arm.seeds or seed < arm.seeds]
    for k, (seed, arm) in enumerate(plan):
        console.rule(f"[{k + 1}/{len(plan)}] {arm.name}, seed {seed}")
        spec = DemoRun(f"runs/{arm.name}-s{seed}", arm.model, arm.distill, arm.targets,
                       sets=(*scale.vit_sets, f"run.seed={seed}", *arm.sets, *same_updates(base, arm.fraction)))
        cache = out / "caches" / (f"replay-s{seed}" if arm.targets == "replay" else arm.targets)
        cfg = run_config(base, spec, subset(data, out / "data", arm.fraction), out,
                         teacher=out / teacher_runs[arm.teacher].folder if arm.distill != "none" else None,
                         cache=cache)
        rec = run(cfg, out / "records" / f"{arm.name}-s{seed}.json", console,
                  {"arm": arm.name, "question": arm.question, "seed": seed, "fraction": arm.fraction,
                   "distill": arm.distill, "targets": arm.targets, "teacher": arm.teacher})
        records["runs"].append(rec)
    return records


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None for one seed)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        out[arm] = {h: mean_std([r[f"top1_{h}"] for r in mine]) for h in HEADS if f"top1_{h}" in mine[0]}
        out[arm]["wall_s"] = mean_std([r["wall_s"] for r in mine])
        out[arm]["train_img_s"] = mean_std([r["train_img_s"] for r in mine])
    return out


# (claim, arm a, head a, arm b, head b): the claim holds where a - b > 0.
CLAIMS = (
    ("distillation helps: hard vs none", "hard", "joint", "none", "joint"),
    ("hard distillation beats soft", "hard", "joint", "soft", "joint"),
    ("the joint classifier beats the class head alone", "hard", "joint", "hard", "cls"),
    ("the joint classifier beats the distillation head alone", "hard", "joint", "hard", "dist"),
    ("the distillation head beats the class head", "hard", "dist", "hard", "cls"),
    ("a convnet teacher beats a transformer teacher of similar accuracy", "hard-convnet-matched", "joint",
     "hard-transformer", "joint"),
    ("distillation helps with 10% of the images", "hard-10pct", "joint", "none-10pct", "joint"),
    ("distillation helps with 30% of the images", "hard-30pct", "joint", "none-30pct", "joint"),
    ("replayed targets train as the live teacher", "hard-replay", "joint", "hard", "joint"),
    ("label-map targets train as the live teacher", "hard-labelmap", "joint", "hard", "joint"),
)


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claim as per-seed differences (students of one seed share their initialisation and
    data order): their mean ± std, and how many seeds point the claim's way. With the
    gains at 10% and at 100%, "distillation helps most when data is scarce" is their difference."""
    top1 = {(r["arm"], r["seed"], h): r[f"top1_{h}"] for r in runs for h in HEADS if f"top1_{h}" in r}
    seeds = sorted({r["seed"] for r in runs})

    def diffs(a: str, ha: str, b: str, hb: str) -> list[float] | None:  # over the seeds both arms ran
        both = [s for s in seeds if (a, s, ha) in top1 and (b, s, hb) in top1]
        return [top1[a, s, ha] - top1[b, s, hb] for s in both] or None

    out = []
    for claim, a, ha, b, hb in CLAIMS:
        if (d := diffs(a, ha, b, hb)) is not None:
            out.append({"claim": claim, "a": f"{a}/{ha}", "b": f"{b}/{hb}", **mean_std(d),
                        "seeds_for": sum(x > 0 for x in d), "diffs": d})
    scarce, full = diffs("hard-10pct", "joint", "none-10pct", "joint"), diffs("hard", "joint", "none", "joint")
    if scarce is not None and full is not None:
        d = [x - y for x, y in zip(scarce, full)]
        out.append({"claim": "distillation helps more with 10% of the images than with all of them",
                    "a": "gain at 10%", "b": "gain at 100%", **mean_std(d), "seeds_for": sum(x > 0 for x in d),
                    "diffs": d})
    return out


def fmt(stat: dict[str, Any] | None) -> str:
    if not stat:
        return ""
    return f"{stat['mean']:.1f}" + (f" ± {stat['std']:.1f}" if stat["std"] is not None else "")


def print_table(report: dict[str, Any], console: Console) -> None:
    n = report["settings"]["seeds"]
    table = Table(title=f"ablation: top-1 (%) on the synthetic val split, mean ± std over {n} seed(s)")
    for col in ("arm", "question", "cls", "dist", "joint", "train img/s", "wall s"):
        table.add_column(col, justify="left" if col in ("arm", "question") else "right")
    questions = {r["arm"]: r["question"] for r in report["runs"]}
    for arm, s in report["arms"].items():
        table.add_row(arm, questions[arm], fmt(s.get("cls")), fmt(s.get("dist")), fmt(s["joint"]),
                      f"{s['train_img_s']['mean']:.0f}", f"{s['wall_s']['mean']:.0f}")
    Console(width=max(120, console.width), stderr=True).print(table)
    for name, t in report["teachers"].items():
        console.print(f"teacher {name}: top-1 {t['top1_joint']:.1f}%, {t['wall_s']:.0f} s")
    for c in report["comparisons"]:
        console.print(f"{c['claim']}: {c['a']} - {c['b']} = {fmt(c)} points ({c['seeds_for']}/{c['n']} seeds for)")


def _errorbars(ax, labels: list[str], series: dict[str, list[dict | None]]) -> None:
    """Grouped bars: one group per label, one bar per series (mean, std as error bar)."""
    width = 0.8 / len(series)
    for k, (name, stats) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i, s in enumerate(stats) if s]  # no bar for a head
        stats = [s for s in stats if s]  # an arm lacks (deit_tiny has no dist head)
        ax.bar(xs, [s["mean"] for s in stats], width, yerr=[s["std"] or 0.0 for s in stats], capsize=3, label=name,
               color=f"C{k}")
        for x, s in zip(xs, stats):
            ax.text(x, s["mean"] + (s["std"] or 0) + 0.5, f"{s['mean']:.1f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8)


def draw(report: dict[str, Any], results: Path) -> list[Path]:
    """One figure per question, beside the results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, n = report["arms"], report["settings"]["seeds"]
    figures = []
    by_question: dict[str, list[str]] = {}
    for r in report["runs"]:
        by_question.setdefault(r["question"], [])
        if r["arm"] not in by_question[r["question"]]:
            by_question[r["question"]].append(r["arm"])
    teacher_of = {r["arm"]: r["teacher"] for r in report["runs"]}
    for question, names in by_question.items():
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 3.8))
        if question == "scarcity":  # the 100% points are the distillation question's none and hard
            for kind, label in (("none", "no distillation"), ("hard", "hard distillation")):
                points = sorted((pct, arms[a]["joint"]) for pct, a in ((10, f"{kind}-10pct"), (30, f"{kind}-30pct"),
                                                                       (100, kind)) if a in arms)
                ax.errorbar([p for p, _ in points], [s["mean"] for _, s in points],
                            yerr=[s["std"] or 0 for _, s in points], marker="o", capsize=3, label=label)
            ax.set_xlabel("% of the training images")
            ax.set_ylabel("top-1 (%), joint head")
            ax.legend(fontsize=8)
        else:
            if question == "teacher" and "hard" in arms:
                names = [*names, "hard"]  # the full convnet teacher, for scale
            labels = [a if question != "teacher" else
                      f"{a}\nteacher {report['teachers'][teacher_of[a]]['top1_joint']:.0f}%" for a in names]
            _errorbars(ax, labels, {h: [arms[a].get(h) for a in names] for h in HEADS})
        ax.set_title(f"{question}: mean ± std over {n} seed(s)", fontsize=10)
        fig.tight_layout()
        path = results.with_name(f"{results.stem}-{question}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append(path)
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller data set and short schedules (minutes)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test's seconds-long study
    p.add_argument("--seeds", type=int, default=None, help="students per arm (default 3; 1 with --quick)")
    p.add_argument("--out", type=Path, default=Path("ablation-out"), help="run folders, caches, records")
    p.add_argument("--results", type=Path, default=None, help="the results JSON (default OUT/ablation.json)")
    p.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every run")
    a = p.parse_args(argv)
    scale = TINY if a.tiny else QUICK if a.quick else FULL
    seeds = a.seeds or (1 if a.quick or a.tiny else 3)
    known = {arm.name: arm for arm in ARMS}
    wanted = [s for s in a.arms.split(",") if s]
    if unknown := [s for s in wanted if s not in known]:
        raise UserError(f"unknown arm {unknown[0]!r}; choose from: {', '.join(known)}")
    arms = tuple(known[s] for s in wanted) if wanted else ARMS
    console = Console(stderr=True)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    start = time.perf_counter()
    records = study(scale, seeds, a.out, arms, a.sets, console)
    report = {"benchmark": "ablation", **measured_on(torch.device("cpu")),
              "settings": {"scale": "tiny" if a.tiny else "quick" if a.quick else "full", "seeds": seeds,
                           "student_epochs": scale.student_epochs, "data": scale.data.to_json(),
                           "teacher_epochs": {"convnet": scale.convnet_epochs, "convnet-matched": scale.matched_epochs,
                                              "transformer": scale.transformer_epochs},
                           "sets": [*scale.sets, *a.sets]},
              "command": "ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              **records, "arms": aggregate(records["runs"]), "comparisons": compare(records["runs"]),
              "study_wall_s": time.perf_counter() - start}
    results = a.results or a.out / "ablation.json"
    write_report(report, results)
    figures = draw(report, results)
    print_table(report, console)
    console.print(f"wrote {results} and {', '.join(str(f) for f in figures)}")
    return report


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # bad input: one line, exit 2, the records written so far kept
        print(f"ablation.py: {e}", file=sys.stderr)
        sys.exit(2)
