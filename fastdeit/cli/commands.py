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

from fastdeit.api import build_train_config
from fastdeit.cli import data_commands as cli_data  # noqa: F401  (registers the data commands on the app)
from fastdeit.cli.base import _one_of, app, command, err
from fastdeit.cli.options import options
from fastdeit.config.files import to_toml
from fastdeit.config.flags import Given, alone_values
from fastdeit.config.recipes import RECIPES, recipe
from fastdeit.config.schema import Head, apply_overrides, check_choice
from fastdeit.errors import UserError
from fastdeit.models.fetch import local_weights
from fastdeit.runtime.cache_folder import cache_dir
from fastdeit.training.sinks import check_sink


@app.command()
@command
@options("train")
def train(given: Given) -> None:
    """Train a model; distill from a teacher with --distill soft|hard; --gpus N for many GPUs."""
    from fastdeit.runtime.launch import SUMMARY_KEYS, start, topology

    g = given
    topo = topology(g.gpus, g.procs, g.nodes, g.node_rank, g.rdzv_endpoint, g.max_restarts, g.device)
    settings = {**g.settings(), "run.device": topo.device if topo else g.device}
    cfg = build_train_config(g.recipe_name, settings, g.overrides, g.config_file)
    check_sink(cfg.run.log)
    summary = start(cfg, topo, g.resume, err)
    if summary is not None:
        print(json.dumps({k: summary[k] for k in SUMMARY_KEYS}))


@app.command("cache-teacher")
@command
@options("cache-teacher")
def cache_teacher(given: Given) -> None:
    """Cache the teacher's outputs on disk, so that distillation runs read instead of computing them."""
    from fastdeit.distill.cache_format import check_cache_out
    from fastdeit.runtime.launch import start_cache_teacher, topology

    g = given
    topo = topology(g.gpus, g.procs, device=g.device)
    if topo is not None and g.verify_batches:
        raise UserError("--verify runs in one process: drop --gpus")
    if g.out is None:
        raise UserError("--out CACHE is required: the cache folder")
    if not (g.teacher or g.teacher_ckpt):
        raise UserError("cache-teacher needs a teacher: --teacher NAME and/or --teacher-ckpt PATH")
    cfg = build_train_config(g.recipe_name, {**g.settings(), "distill.mode": "hard"}, g.overrides)
    check_cache_out(Path(g.out), Path(cfg.data.path))
    if g.verify_batches:
        from fastdeit.distill.cache_build import cache_teacher as run

        print(json.dumps(run(cfg, g.mode, g.out, g.verify_batches, err)))
    elif (result := start_cache_teacher(cfg, topo, g.mode, g.out, err)) is not None:
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
@options("eval")
def eval_cmd(given: Given) -> None:
    """Top-1 / top-5 on the val split, plus img/s."""
    from fastdeit.training.evaluate import Architecture, check_eval_args, evaluate_checkpoint
    from fastdeit.training.rundir import weights_of

    g = given
    check_eval_args(g.device, g.batch_size, g.workers, g.loader)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        weights = weights_of(local_weights(g.ckpt, cache_dir()))  # a run folder: its best checkpoint
        res = evaluate_checkpoint(weights, g.data, g.device, g.batch_size, g.workers, g.ema, g.loader, cache_dir(),
                                  Architecture(g.model or "", g.img_size, g.patch_size),
                                  lambda d, t: bar.update(task, completed=d, total=t))
    head = g.head
    if head not in res.heads:
        raise UserError(f"--head {head}: this model has only the joint head (not distilled)")
    table = Table(title=f"{g.ckpt}")
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
    from fastdeit.models.predict import predict as run
    from fastdeit.training.evaluate import Architecture

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
    from fastdeit.models.export import export as run_export
    from fastdeit.training.rundir import weights_of

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
    from fastdeit.report.run_report import write_report

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
    default compile mode): give them their value (`auto`) when no value follows."""
    out, alone = [], alone_values()
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        out.append(f"{arg}={alone[arg]}" if arg in alone and (nxt is None or nxt.startswith("-")) else arg)
    return out


def run_app() -> None:
    """The typer app on this process's arguments (`--resume` alone given its value)."""
    app(args=optional_values(sys.argv[1:]), prog_name="fastdeit")


if __name__ == "__main__":
    sys.exit(run_app())
