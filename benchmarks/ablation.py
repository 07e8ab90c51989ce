"""The DeiT paper's comparisons as a study with error bars, on the embedded synthetic data.

    python benchmarks/ablation.py [--quick] [--seeds N] [--out DIR] [--results FILE]

Questions, each answered by arms (one training configuration) run once per seed:
  distillation  none / soft / hard with the live convnet teacher, hard with replayed and with
                label-map targets; the cls, dist and joint heads of every distilled arm
  teacher       hard distillation from a transformer teacher vs a convnet teacher trained to
                a similar accuracy (and the full convnet teacher, for scale)
  scarcity      10%, 30% and 100% of the training images, without and with distillation, at
                the same number of updates (epochs, warm-up and eval interval x 100/fraction)
  recipe        DeiT III's recipe (3-Augment, BCE, no smoothing, LAMB at an unscaled lr, eval
                crop 1.0; a LayerScale student of DeiT-tiny's shape) without and with hard
                distillation, against DeiT's (the none and hard arms)
Teachers are trained once (seed 0), students once per seed (run.seed), each in a normal run
folder under DIR/runs. A run with a record is skipped, a run cut short resumes from its last
checkpoint, a record made with other settings is refused: restarting loses and mixes nothing.
Writes FILE (default DIR/ablation.json: every run, mean ± std per arm and head, per-claim
differences) and one figure per question beside it.
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
from ablation_report import HEADS, draw, print_table  # benchmarks/, beside this script
from rich.console import Console

from fastdeit.config.recipes import recipe
from fastdeit.config.schema import TrainConfig, apply_overrides, load_json
from fastdeit.data.synthetic import SyntheticSet
from fastdeit.demo import DemoRun, ensure_data, run_config, train_run
from fastdeit.errors import UserError, differences
from fastdeit.report.provenance import measured_on, write_results
from fastdeit.training.rundir import RunDir

CONVNET = ("model.width=0.5", "optim.lr=0.016", "run.batch_size=64")  # the demo's teacher recipe
# What --recipe deit3 changes in DeiT's recipe, applied to the study's (the demo's: its epochs,
# image size, batch, and its light crop without mixup, erasing or RandAugment). DeiT III's
# epochs (800) and drop path are not taken: every arm trains as long, without drop path.
DEIT3 = ("optim.opt=lamb", "optim.lr=4e-3", "optim.scale_lr=false", "aug.three_augment=true", "aug.color_jitter=0.3",
         "aug.smoothing=0.0", "distill.base_loss=bce", "data.crop_pct=1.0")
DEIT3_TINY = ("model.embed_dim=192", "model.num_heads=3")  # deit3_small at DeiT-tiny's width: LayerScale


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
    Arm("deit3", "recipe", model="deit3_small", sets=(*DEIT3, *DEIT3_TINY)),
    # DeiT III has no distillation token: distilled, the student is DeiT-tiny's distilled model.
    Arm("deit3-hard", "recipe", distill="hard", sets=DEIT3),
)


def teachers(scale: Scale) -> dict[str, DemoRun]:
    convnets = {"convnet": scale.convnet_epochs, "convnet-matched": scale.matched_epochs}
    return {**{k: DemoRun(f"teachers/{k}", "resnet18", sets=(*CONVNET, f"sched.epochs={n}"))
               for k, n in convnets.items()},
            "transformer": DemoRun("teachers/transformer", "deit_tiny",
                                   sets=(*scale.vit_sets, f"sched.epochs={scale.transformer_epochs}"))}


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
                if not (link := root / split / cls.name / f.name).exists():
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
        then = settings(load_json(RunDir(cfg.run.out).config))
    # A key added to the config after the record was made, still at its default, trained the same.
    defaults = settings(TrainConfig())
    what = [(k, a, b) for k, a, b in differences(then, settings(cfg)) if not (a is None and b == _at(defaults, k))] \
        if then is not None else []
    if what:
        said = "; ".join(f"{k} {a} then, {b} now" for k, a, b in what[:3])
        raise UserError(f"{record} was trained with other settings ({said}): delete it and {cfg.run.out} to "
                        f"train it again, or pick another --out")


def _at(d: dict[str, Any], dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return d.get(section, {}).get(key)


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
    summary = train_run(cfg, console, resume=folder.last if folder.last.exists() else None)
    rec = {**extra, "top1_joint": summary["top1"], "top5": summary["top5"], "train_img_s": summary["train_img_s"],
           "wall_s": summary["wall_s"], "settings": settings(cfg)}
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
    todo = sum(not (out / "records" / f"{arm.name}-s{seed}.json").exists() for seed, arm in plan)
    for k, (seed, arm) in enumerate(plan):
        per_run = statistics.fmean([r["wall_s"] for r in records["runs"]] or [records["teachers"]["convnet"]["wall_s"]])
        console.rule(f"[{k + 1}/{len(plan)}] {arm.name}, seed {seed} ({todo} runs left to train, about "
                     f"{todo * per_run / 60:.0f} min)")
        spec = DemoRun(f"runs/{arm.name}-s{seed}", arm.model, arm.distill, arm.targets,
                       sets=(*scale.vit_sets, f"run.seed={seed}", *arm.sets, *same_updates(base, arm.fraction)))
        cache = out / "caches" / (f"replay-s{seed}" if arm.targets == "replay" else arm.targets)
        cfg = run_config(base, spec, subset(data, out / "data", arm.fraction), out,
                         teacher=out / teacher_runs[arm.teacher].folder if arm.distill != "none" else None,
                         cache=cache)
        record = out / "records" / f"{arm.name}-s{seed}.json"
        todo -= not record.exists()
        records["runs"].append(run(cfg, record, console, {
            "arm": arm.name, "question": arm.question, "seed": seed, "fraction": arm.fraction,
            "distill": arm.distill, "targets": arm.targets, "teacher": arm.teacher}))
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


# (claim, arm a, head a, arm b, head b, kind): "more" holds where a - b > 0, "same" where a == b.
CLAIMS = (
    ("distillation helps: hard vs none", "hard", "joint", "none", "joint", "more"),
    ("hard distillation beats soft", "hard", "joint", "soft", "joint", "more"),
    ("the joint classifier beats the class head alone", "hard", "joint", "hard", "cls", "more"),
    ("the joint classifier beats the distillation head alone", "hard", "joint", "hard", "dist", "more"),
    ("the distillation head beats the class head", "hard", "dist", "hard", "cls", "more"),
    ("a convnet teacher beats a transformer teacher of similar accuracy", "hard-convnet-matched", "joint",
     "hard-transformer", "joint", "more"),
    ("distillation helps with 10% of the images", "hard-10pct", "joint", "none-10pct", "joint", "more"),
    ("distillation helps with 30% of the images", "hard-30pct", "joint", "none-30pct", "joint", "more"),
    ("replayed targets train as the live teacher", "hard-replay", "joint", "hard", "joint", "same"),
    ("label-map targets train as the live teacher", "hard-labelmap", "joint", "hard", "joint", "same"),
    ("DeiT III's recipe without a teacher beats DeiT's with one", "deit3", "joint", "hard", "joint", "more"),
    ("DeiT III's recipe beats DeiT's, both without a teacher", "deit3", "joint", "none", "joint", "more"),
    ("distillation helps under DeiT III's recipe", "deit3-hard", "joint", "deit3", "joint", "more"),
)


def _claim(claim: str, a: str, b: str, d: list[float], kind: str) -> dict[str, Any]:
    holds = (lambda x: x > 0) if kind == "more" else (lambda x: x == 0)
    return {"claim": claim, "a": a, "b": b, "kind": kind, **mean_std(d), "seeds_for": sum(map(holds, d)),
            "diffs": d}


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claim as per-seed differences (students of one seed share their initialisation and
    data order): their mean ± std, and on how many seeds the claim holds (a > b, or a == b for
    the claims of equal training). "Distillation helps most when data is scarce" is the gain
    at 10% (30%) minus the gain at 100%, seed by seed."""
    top1 = {(r["arm"], r["seed"], h): r[f"top1_{h}"] for r in runs for h in HEADS if f"top1_{h}" in r}
    seeds = sorted({r["seed"] for r in runs})

    def diffs(a: str, ha: str, b: str, hb: str) -> dict[int, float]:  # seed -> a - b, where both arms ran
        return {s: top1[a, s, ha] - top1[b, s, hb] for s in seeds if (a, s, ha) in top1 and (b, s, hb) in top1}

    out = [_claim(claim, f"{a}/{ha}", f"{b}/{hb}", list(d.values()), kind) for claim, a, ha, b, hb, kind in CLAIMS
           if (d := diffs(a, ha, b, hb))]
    gain = diffs("hard", "joint", "none", "joint")
    for pct in (10, 30):
        scarce = diffs(f"hard-{pct}pct", "joint", f"none-{pct}pct", "joint")
        if d := [x - gain[s] for s, x in scarce.items() if s in gain]:
            out.append(_claim(f"distillation helps more with {pct}% of the images than with all of them",
                              f"gain at {pct}%", "gain at 100%", d, "more"))
    return out


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
              # every run's wall time, whichever sitting trained it: what the study costs in one go
              "compute_wall_s": sum(r["wall_s"] for r in [*records["teachers"].values(), *records["runs"]]),
              "sitting_wall_s": time.perf_counter() - start}
    results = a.results or a.out / "ablation.json"
    write_results(report, results)
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
