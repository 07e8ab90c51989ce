"""The `fastdeit` command: parses flags into a TrainConfig and hands over. No training logic here.

Bad input is one line on stderr and exit code 2, without a traceback (see `command`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fastdeit import cli_data  # noqa: F401  (registers the data commands on the app)
from fastdeit.api import build_train_config
from fastdeit.cli_base import _one_of, app, cache_dir, command, err
from fastdeit.config import (
    AttnBackend,
    CacheMode,
    DistillMode,
    Head,
    Loader,
    TeacherTargets,
    apply_overrides,
    check_choice,
)
from fastdeit.config_files import to_toml
from fastdeit.errors import UserError
from fastdeit.fetch import local_weights
from fastdeit.recipes import RECIPES, recipe
from fastdeit.sinks import check_sink


@app.command()
@command
def train(
    data: Path = typer.Option(None, help="ImageFolder root (train/, val/) or a prepared data set."),
    model: str = typer.Option(None, help="deit_tiny/small/base[_distilled] or any timm classifier."),
    out: Path = typer.Option(None, help="Run folder (config.json, metrics.jsonl, checkpoints, summary.json)."),
    recipe_name: str = typer.Option("deit", "--recipe", help=" | ".join(RECIPES) + " (deit: the paper's ImageNet "
                                    "recipe; `fastdeit recipe NAME` prints one)."),
    config_file: Path = typer.Option(None, "--config", help="A TOML or JSON file of config sections (a run's "
                                     "config.json too), over the recipe and under the flags and --set."),
    epochs: int = typer.Option(None, help="Training epochs."),
    batch_size: int = typer.Option(None, help="Global batch size (split across ranks)."),
    img_size: int = typer.Option(None, help="Training and eval resolution."),
    lr: float = typer.Option(None, help="Learning rate at batch 512; scaled by batch_size/512."),
    distill: str = typer.Option(None, help=_one_of(DistillMode) + "."),
    alpha: float = typer.Option(None, help="Weight of the distillation loss."),
    tau: float = typer.Option(None, help="Temperature of soft distillation."),
    teacher: str = typer.Option(None, help="Teacher model name (timm)."),
    teacher_ckpt: str = typer.Option(None, help="Teacher weights: a fastdeit checkpoint, a state_dict, a URL."),
    targets: str = typer.Option(None, help=_one_of(TeacherTargets) + ": where the teacher's outputs come from."),
    teacher_cache: Path = typer.Option(None, help="Cache folder for --targets replay|labelmap."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    loader: str = typer.Option(None, help=_one_of(Loader) + " (auto: dali when CUDA and DALI are there)."),
    seed: int = typer.Option(None, help="Seed of the augmentation plan and the initialisation."),
    resume: str = typer.Option(None, help="Resume from this checkpoint; `--resume` alone: OUT/checkpoint-last.pt "
                               "if there is one, else start (so a requeued job needs no other flags)."),
    attn: str = typer.Option(None, help="Attention backend: " + _one_of(AttnBackend) + "."),
    compile_mode: str = typer.Option(None, "--compile", help="torch.compile the student; `--compile` alone: "
                                     "mode `default` (measured best on an H200, see docs/performance.md)."),
    gpus: int = typer.Option(None, help="GPUs per node: one worker each, started through torchrun "
                             "(0: CPU workers, see --procs). Default: one process, no torchrun."),
    procs: int = typer.Option(1, help="With --gpus 0: the number of CPU worker processes (gloo)."),
    nodes: int = typer.Option(1, help="Machines in the run (torchrun --nnodes)."),
    node_rank: int = typer.Option(0, help="This machine's number, 0..nodes-1."),
    rdzv_endpoint: str = typer.Option(None, help="HOST:PORT of node 0 for the c10d rendezvous (multi-node)."),
    ckpt_every: int = typer.Option(None, help="Steps between checkpoints besides every epoch's end (0: epoch ends "
                                   "only); a restarted or resumed run continues from the last one."),
    max_restarts: int = typer.Option(0, help="Times torchrun restarts a failed worker group; it resumes from "
                                     "the last checkpoint."),
    teacher_img_size: int = typer.Option(None, help="The resolution the teacher sees (default: the student's)."),
    train_only: str = typer.Option(None, help="all | head (a linear probe) | attn (the official --attn-only)."),
    log: str = typer.Option(None, help="none | tensorboard (RUN/tensorboard/) | wandb, besides metrics.jsonl."),
    accum_steps: int = typer.Option(None, help="Micro-batches per update on each rank: the same training in 1/K "
                                    "of the activation memory."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value (repeatable)."),
) -> None:
    """Train a model; distill from a teacher with --distill soft|hard; --gpus N for many GPUs."""
    from fastdeit.launch import SUMMARY_KEYS, start, topology

    topo = topology(gpus, procs, nodes, node_rank, rdzv_endpoint, max_restarts, device)
    cfg = build_train_config(recipe_name, {
        "data.path": data, "model.name": model, "run.out": out, "sched.epochs": epochs, "run.batch_size": batch_size,
        "data.img_size": img_size, "optim.lr": lr, "distill.mode": distill, "distill.alpha": alpha,
        "distill.tau": tau, "distill.teacher": teacher, "distill.teacher_ckpt": teacher_ckpt,
        "distill.targets": targets, "distill.teacher_cache": teacher_cache,
        "run.device": topo.device if topo else device, "data.loader": loader, "run.seed": seed, "model.attn": attn,
        "run.compile": compile_mode, "run.ckpt_every": ckpt_every, "distill.teacher_img_size": teacher_img_size,
        "model.train_only": train_only, "run.log": log, "run.accum_steps": accum_steps}, overrides, config_file)
    check_sink(cfg.run.log)
    summary = start(cfg, topo, resume, err)
    if summary is not None:
        print(json.dumps({k: summary[k] for k in SUMMARY_KEYS}))


@app.command("cache-teacher")
@command
def cache_teacher(
    data: Path = typer.Option(None, help="ImageFolder root (train/, val/) or a prepared data set."),
    teacher: str = typer.Option(None, help="Teacher model name (timm); read from a fastdeit checkpoint if omitted."),
    teacher_ckpt: str = typer.Option(None, help="Teacher weights (a path or an http(s) URL)."),
    out: Path = typer.Option(None, help="The cache folder (created; a killed build resumes in it)."),
    mode: str = typer.Option("replay", help=_one_of(CacheMode) + ": exact, per epoch | one pass per image."),
    epochs: int = typer.Option(None, help="replay: cover epochs 0..E-1 (default: the recipe's)."),
    topk: int = typer.Option(None, help="Logits (replay) or class scores per cell (labelmap) to keep."),
    teacher_img_size: int = typer.Option(None, help="replay: the resolution the teacher sees (the runs' setting)."),
    recipe_name: str = typer.Option("deit", "--recipe", help="The plan's recipe: it must be the training run's."),
    batch_size: int = typer.Option(None, help="Global batch of the training runs (part of the plan)."),
    img_size: int = typer.Option(None, help="Training resolution (part of the plan)."),
    seed: int = typer.Option(None, help="The training runs' seed (part of the plan)."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    loader: str = typer.Option(None, help=_one_of(Loader) + "."),
    verify_batches: int = typer.Option(0, "--verify", help="Instead of building: re-run the teacher on N cached "
                                                             "batches and report the agreement."),
    gpus: int = typer.Option(None, help="GPUs to build with: each builds every N-th shard (0: CPU workers)."),
    procs: int = typer.Option(1, help="With --gpus 0: the number of CPU worker processes (gloo)."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value (repeatable), as for train."),
) -> None:
    """Cache the teacher's outputs on disk, so that distillation runs read instead of computing them."""
    from fastdeit.launch import start_cache_teacher, topology

    check_choice("--mode", mode, CacheMode)
    topo = topology(gpus, procs, device=device)
    if topo is not None and verify_batches:
        raise UserError("--verify runs in one process: drop --gpus")
    if out is None:
        raise UserError("--out CACHE is required: the cache folder")
    if not (teacher or teacher_ckpt):
        raise UserError("cache-teacher needs a teacher: --teacher NAME and/or --teacher-ckpt PATH")
    cfg = build_train_config(recipe_name, {
        "data.path": data, "run.out": out, "sched.epochs": epochs, "run.batch_size": batch_size,
        "data.img_size": img_size, "distill.mode": "hard", "distill.teacher": teacher,
        "distill.teacher_ckpt": teacher_ckpt, "run.device": device, "run.seed": seed, "data.loader": loader,
        "distill.topk": topk, "distill.teacher_img_size": teacher_img_size}, overrides)
    if verify_batches:
        from fastdeit.caching import cache_teacher as run

        print(json.dumps(run(cfg, mode, out, verify_batches, err)))
    elif (result := start_cache_teacher(cfg, topo, mode, out, err)) is not None:
        print(json.dumps(result))


@app.command("recipe")
@command
def recipe_cmd(
    name: str = typer.Argument(..., help=" | ".join(RECIPES) + "."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value (repeatable), as for train."),
) -> None:
    """Print a recipe's whole config as TOML, for `fastdeit train --config FILE` to read back."""
    cfg = apply_overrides(recipe(name), overrides)
    print(to_toml(cfg, header=f"fastdeit recipe {name}" + "".join(f" --set {o}" for o in overrides)
                  + "\norder: recipe < this file (--config) < flags < --set"), end="")


@app.command("eval")
@command
def eval_cmd(
    data: Path = typer.Option(..., help="ImageFolder root or prepared data set; its val split is evaluated."),
    ckpt: str = typer.Option(..., "--ckpt", "--weights", help="A fastdeit checkpoint, or weights from elsewhere "
                             "(official DeiT .pth, timm, .safetensors; a path or an http(s) URL) with --model."),
    model: str = typer.Option(None, help="For weights that do not name their model: e.g. deit_small_distilled."),
    img_size: int = typer.Option(224, help="With --model: the resolution to evaluate at."),
    patch_size: int = typer.Option(16, help="With --model: the model's patch size."),
    head: str = typer.Option("joint", help=_one_of(Head) + " (distilled models have all three)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    batch_size: int = typer.Option(256, help="Eval batch size."),
    workers: int = typer.Option(2, help="Loader processes."),
    ema: bool = typer.Option(False, help="Evaluate the EMA weights."),
    loader: str = typer.Option("auto", help=_one_of(Loader) + "."),
) -> None:
    """Top-1 / top-5 on the val split, plus img/s."""
    from fastdeit.evaluation import Architecture, evaluate_checkpoint

    check_choice("--head", head, Head)
    check_choice("--loader", loader, Loader)
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0: load in this process), got {workers}")
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        res = evaluate_checkpoint(local_weights(ckpt, cache_dir()), data, device, batch_size, workers, ema, loader,
                                  cache_dir(), Architecture(model or "", img_size, patch_size),
                                  lambda d, t: bar.update(task, completed=d, total=t))
    if head not in res.heads:
        raise UserError(f"--head {head}: this model has only the joint head (not distilled)")
    table = Table(title=f"{ckpt}")
    for col in ("head", "top-1", "top-5", "images", "img/s"):
        table.add_column(col)
    table.add_row(head, f"{res.top1(head):.2f}", f"{res.top5(head):.2f}", str(res.n), f"{res.img_s:.0f}")
    Console(stderr=True).print(table)
    if res.bad:
        err.print(f"warning: {res.bad} unreadable val images were left out")
    print(json.dumps({"head": head, "top1": res.top1(head), "top5": res.top5(head), "images": res.n,
                      "img_s": res.img_s, "unreadable": res.bad}))


@app.command()
@command
def predict(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    weights: str = typer.Option(..., help="A run folder (its best checkpoint), a checkpoint, or weights from "
                                "elsewhere (a path or an http(s) URL) with --model."),
    model: str = typer.Option(None, help="For weights that do not name their model."),
    img_size: int = typer.Option(224, help="With --model: the input resolution."),
    head: str = typer.Option("joint", help=_one_of(Head) + " (distilled models have all three)."),
    topk: int = typer.Option(5, help="Classes to list per image (at least 1; more than the model has lists "
                             "all of its classes, with a note)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
) -> None:
    """The top classes of each image (one JSON line each), with the run's class names."""
    from fastdeit.evaluation import Architecture
    from fastdeit.predicting import predict as run

    check_choice("--head", head, Head)
    if topk < 1:
        raise UserError(f"--topk {topk}: list at least 1 class per image")
    path = local_weights(weights, cache_dir())  # a URL downloaded once; a path as it is
    noted = False
    for record in run(images, path, Architecture(model or "", img_size), head, topk, device):
        if not noted and "top" in record and len(record["top"]) < topk:  # fewer classes: all are listed
            err.print(f"note: --topk {topk}: the model has {len(record['top'])} classes; listing all of them")
            noted = True
        print(json.dumps(record))
        err.print(f"{record['image']}: " + (", ".join(f"{c} {p:.1%}" for c, p in record["top"])
                                            if "top" in record else record["error"]))


@app.command()
@command
def export(
    run: Path = typer.Argument(..., help="A run folder (its best checkpoint) or a fastdeit checkpoint."),
    fmt: str = typer.Option("hf", "--format", help="hf (transformers) | timm | safetensors."),
    out: Path = typer.Option(..., help="The folder to write (new or empty)."),
    ema: bool = typer.Option(False, help="Export the EMA weights."),
) -> None:
    """Write a trained student for Hugging Face transformers, timm, or as safetensors."""
    from fastdeit.export import export as run_export
    from fastdeit.predicting import weights_of

    if fmt not in ("hf", "timm", "safetensors"):
        raise UserError(f"--format {fmt}: use hf, timm or safetensors")
    for path in run_export(weights_of(run), fmt, out, ema):
        print(path)


@app.command()
@command
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (several: drawn side by side)."),
    out: Path = typer.Option(Path("report.html"), help="The HTML page; its PNGs go to OUT-figures/. Only a "
                             "report this command wrote is written over (any other file is refused)."),
    smooth: float = typer.Option(0.6, help="EMA weight in [0, 1) smoothing the step curves (loss, img/s, data "
                                 "wait), raw points kept faintly; 0: off. The page's slider changes it."),
) -> None:
    """Curves of one or more runs (loss, lr, top-1/top-5 per head, img/s, ...) in one HTML page:
    one colour per run, zoom, hover, runs hidden and shown across figures."""
    from fastdeit.report import write_report

    result = write_report(runs, out, smooth)
    for note in result["notes"]:
        err.print(f"note: {note}")
    err.print(f"wrote {out} ({len(result['figures'])} figures) and {out.stem}-figures/")
    print(json.dumps({"report": str(out), "figures": sorted(result["figures"]), "pngs": result["pngs"]}))


@app.command()
@command
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Folder for the demo's runs and summary.json."),
    data: Path = typer.Option(None, help="Where the synthetic data lives (default: the fastdeit cache)."),
) -> None:
    """Generate the synthetic data, train a teacher, a DeiT-tiny and three distilled DeiT-tinies."""
    from fastdeit.demo import run_demo

    run_demo(out, data or cache_dir() / "synthetic-v1", err)


def optional_values(argv: list[str]) -> list[str]:
    """`--resume` and `--compile` may stand alone (the run folder's last checkpoint; the
    default compile mode): give them the value `auto` when no value follows."""
    out = []
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        alone = arg in ("--resume", "--compile") and (nxt is None or nxt.startswith("-"))
        out.append(f"{arg}=auto" if alone else arg)
    return out


def main() -> None:
    app(args=optional_values(sys.argv[1:]), prog_name="fastdeit")


if __name__ == "__main__":
    sys.exit(main())
