"""The `fastdeit` command: parses flags into a TrainConfig and hands over. No training logic here.

Bad input is one line on stderr and exit code 2, without a traceback (see `command`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from fastdeit.config import (
    AttnBackend,
    CacheMode,
    DistillMode,
    Head,
    Loader,
    TeacherTargets,
    TrainConfig,
    apply_overrides,
    check_choice,
    choices,
    recipe,
    validate,
    with_section,
)
from fastdeit.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_STOPPED, Stopped, UserError
from fastdeit.fetch import is_url, local_weights

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train DeiT students, with distillation through the distillation token, fast.")
# Log lines stay whole (paths are greppable), and text is never read as markup: a path or a
# shape in square brackets is printed as it is.
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)

# The config keys that have a flag of their own (train and cache-teacher): an error about a
# key is shown with its flag, unless the key was given with --set.
FLAGS = {"data.path": "--data", "model.name": "--model", "run.out": "--out", "sched.epochs": "--epochs",
         "run.batch_size": "--batch-size", "data.img_size": "--img-size", "optim.lr": "--lr",
         "distill.mode": "--distill", "distill.alpha": "--alpha", "distill.tau": "--tau",
         "distill.teacher": "--teacher", "distill.teacher_ckpt": "--teacher-ckpt", "distill.targets": "--targets",
         "distill.teacher_cache": "--teacher-cache", "run.device": "--device", "data.loader": "--loader",
         "run.seed": "--seed", "model.attn": "--attn", "run.compile": "--compile", "run.ckpt_every": "--ckpt-every",
         "distill.topk": "--topk"}


def _one_of(typ: Any) -> str:
    return " | ".join(choices(typ))


def flagged(text: str, overrides: list[str]) -> str:
    """An error line with config keys shown as this command's flags (keys set with --set stay keys)."""
    given = {item.split("=", 1)[0] for item in overrides}
    for key, flag in FLAGS.items():
        if key not in given:
            text = re.sub(rf"(?<![\w.]){re.escape(key)}(?!\w)", flag, text)
    return text


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command's body, guarded: bad input (UserError) becomes one line and exit code 2;
    Ctrl-C (outside training, which handles its own) says what is kept, exit code 130."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(Text.assemble(("error:", "red"), " ", flagged(str(e), kwargs.get("overrides") or [])))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Stopped as e:
            err.print(str(e), markup=False)
            raise typer.Exit(EXIT_STOPPED) from None
        except KeyboardInterrupt:
            err.print("interrupted: what was finished is on disk; the same command resumes where it can")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return guarded


def cache_dir() -> Path:
    """Where `fastdeit demo` keeps its generated data and measured choices: $FASTDEIT_CACHE,
    else the XDG cache folder."""
    if os.environ.get("FASTDEIT_CACHE"):
        return Path(os.environ["FASTDEIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastdeit"


@app.command("make-data")
@command
def make_data(
    out: Path = typer.Argument(..., help="Folder to write train/ and val/ into."),
    classes: int = typer.Option(10, help="Number of classes (2-10)."),
    train_per_class: int = typer.Option(300, help="Training images per class."),
    val_per_class: int = typer.Option(50, help="Validation images per class."),
    seed: int = typer.Option(0, help="Same seed, byte-identical files."),
) -> None:
    """Write the embedded synthetic data set (JPEG files in an ImageFolder tree)."""
    from fastdeit.data.synthetic import SyntheticSet, write_synthetic

    synthetic = SyntheticSet(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("writing images", total=None)
        try:
            write_synthetic(out, synthetic, progress=lambda d, t: bar.update(task, completed=d, total=t))
        except ValueError as e:
            raise UserError(str(e)) from None
    err.print(f"wrote {classes * (train_per_class + val_per_class)} images to {out}")


@app.command()
@command
def train(
    data: Path = typer.Option(None, help="ImageFolder root holding train/ and val/."),
    model: str = typer.Option(None, help="deit_tiny/small/base[_distilled] or any timm classifier."),
    out: Path = typer.Option(None, help="Run folder (config.json, metrics.jsonl, checkpoints, summary.json)."),
    recipe_name: str = typer.Option("deit", "--recipe", help="deit (the paper's ImageNet recipe) or demo."),
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
                                     "the fastest DDP-safe mode (max-autotune-no-cudagraphs on CUDA)."),
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
        "run.compile": compile_mode, "run.ckpt_every": ckpt_every}, overrides)
    summary = start(cfg, topo, resume, err)
    if summary is not None:
        print(json.dumps({k: summary[k] for k in SUMMARY_KEYS}))


def build_train_config(recipe_name: str, flags: dict[str, Any], overrides: list[str]) -> TrainConfig:
    """The recipe, then the flags given ({config key: value}, None where not given), then the
    --set overrides; validated. The fastdeit cache folder remembers measured choices."""
    cfg = recipe(recipe_name)
    for key, value in {**flags, "run.cache_dir": cache_dir()}.items():
        if value is not None:
            section, name = key.split(".")
            cfg = with_section(cfg, section, **{name: str(value) if isinstance(value, Path) else value})
    cfg = apply_overrides(cfg, overrides)
    for section, name in (("distill", "teacher_ckpt"), ("model", "init")):  # URLs fetched here, once
        if is_url(value := getattr(getattr(cfg, section), name)):
            cfg = with_section(cfg, section, **{name: str(local_weights(value, cache_dir()))})
    if not cfg.data.path:
        raise UserError("--data DIR is required (make one with: fastdeit make-data DIR)")
    if not cfg.run.out:
        raise UserError("--out RUN is required: the run folder to write")
    validate(cfg)
    return cfg


@app.command("cache-teacher")
@command
def cache_teacher(
    data: Path = typer.Option(None, help="ImageFolder root holding train/ and val/."),
    teacher: str = typer.Option(None, help="Teacher model name (timm); read from a fastdeit checkpoint if omitted."),
    teacher_ckpt: str = typer.Option(None, help="Teacher weights (a path or an http(s) URL)."),
    out: Path = typer.Option(None, help="The cache folder (created; a killed build resumes in it)."),
    mode: str = typer.Option("replay", help=_one_of(CacheMode) + ": exact, per epoch | one pass per image."),
    epochs: int = typer.Option(None, help="replay: cover epochs 0..E-1 (default: the recipe's)."),
    topk: int = typer.Option(None, help="Logits (replay) or class scores per cell (labelmap) to keep."),
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
        "distill.topk": topk}, overrides)
    if verify_batches:
        from fastdeit.caching import cache_teacher as run

        print(json.dumps(run(cfg, mode, out, verify_batches, err)))
    elif (result := start_cache_teacher(cfg, topo, mode, out, err)) is not None:
        print(json.dumps(result))


@app.command("index")
@command
def index(data: Path = typer.Argument(..., help="ImageFolder root holding train/ and val/.")) -> None:
    """Scan DATA once and store its index (file list and every image's size) for later starts."""
    import time

    from fastdeit.data.folder import load_dataset
    from fastdeit.data.stored_index import stored_path

    start = time.perf_counter()
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("reading headers", total=None)
        train, val = load_dataset(data, lambda d, t: bar.update(task, completed=d, total=t), cache_dir())
    seconds = time.perf_counter() - start
    err.print(f"{data} is a prepared data set: its index is stored with it, nothing to scan" if train.store else
              f"indexed {len(train)} train and {len(val)} val images of {data} in {seconds:.1f} s: "
              f"{stored_path(cache_dir(), train.root)} and {stored_path(cache_dir(), val.root)}")
    print(json.dumps({"train": len(train), "val": len(val), "seconds": seconds,
                      "unreadable": len(train.skip) + len(val.skip)}))


@app.command("prepare-data")
@command
def prepare_data(
    src: Path = typer.Argument(..., help="ImageFolder root holding train/ and val/."),
    out: Path = typer.Argument(..., help="The prepared data set's folder (a killed build resumes in it)."),
    max_side: int = typer.Option(512, help="Longest side of a stored image (px); 0 keeps the source bytes."),
    quality: int = typer.Option(90, help="JPEG quality of re-encoded images."),
    shard_rows: int = typer.Option(4096, help="Images per tar file."),
    workers: int = typer.Option(0, help="Processes (0: one per CPU core)."),
) -> None:
    """Store DATA once, shrunk to --max-side, in tar shards with one index: fast starts and reads."""
    from fastdeit.preparing import PrepareOptions, summary
    from fastdeit.preparing import prepare_data as run

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("preparing", total=None)
        manifest = run(src, out, PrepareOptions(max_side, quality, shard_rows, workers),
                       lambda d, t: bar.update(task, completed=d, total=t), cache_dir())
    lines, result = summary(manifest, out)
    for line in lines:
        err.print(line)
    print(json.dumps(result))


@app.command("check-data")
@command
def check_data(
    data: Path = typer.Argument(..., help="ImageFolder root holding train/ and val/."),
    out: Path = typer.Option(None, help="Also write the list to this file (for --set data.skip_list=FILE)."),
    loader: str = typer.Option("auto", help="The decoders to try: torch (PIL) | dali | auto (both where DALI is "
                               "installed: each refuses files the other reads)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda: where DALI decodes."),
) -> None:
    """Decode every image once and list the ones a decoder refuses (a skip list)."""
    from fastdeit.data.folder import load_dataset
    from fastdeit.device import resolve_device
    from fastdeit.loaders import check_decoders, find_undecodable

    check_choice("--loader", loader, Loader)
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a folder: name the file to write the list to")
    decoders, dev = check_decoders(loader), resolve_device(device)
    bad, refused = [], {d: 0 for d in decoders}
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("reading headers", total=None)
        train, val = load_dataset(data, lambda d, t: bar.update(task, completed=d, total=t), cache_dir())
        for split, index in (("train", train), ("val", val)):
            if index.store is not None:  # a prepared set: every row's bytes against its checksum first
                crc = bar.add_task(f"checksums {split}", total=len(index))
                rows = list(range(len(index)))
                bad += [f"{split}/{index.paths[i]}"
                        for i in index.store.corrupted(rows, lambda n, t, crc=crc: bar.update(crc, completed=n))]
            tasks = {d: bar.add_task(f"decoding {split} ({d})", total=len(index)) for d in decoders}
            found = find_undecodable(index, decoders, dev,
                                     lambda d, n, t, tasks=tasks: bar.update(tasks[d], completed=n))
            bad += [f"{split}/{index.paths[i]}" for i in found]
            for who in found.values():
                for d in who:
                    refused[d] += 1
    for line in bad:
        print(line)
    if out is not None:
        out.write_text("".join(f"{line}\n" for line in bad))
    err.print(f"{len(bad)} unreadable of {len(train) + len(val)} images ("
              + ", ".join(f"{d} refused {n}" for d, n in refused.items()) + ")"
              + (f"; skip them with --set data.skip_list={out}" if out is not None and bad else ""))


@app.command("eval")
@command
def eval_cmd(
    data: Path = typer.Option(..., help="ImageFolder root; its val/ split is evaluated."),
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
    res = evaluate_checkpoint(local_weights(ckpt, cache_dir()), data, device, batch_size, workers, ema, loader,
                              cache_dir(), Architecture(model or "", img_size, patch_size))
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
    topk: int = typer.Option(5, help="Classes to list per image."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
) -> None:
    """The top classes of each image (one JSON line each), with the run's class names."""
    from fastdeit.evaluation import Architecture
    from fastdeit.predicting import predict as run

    check_choice("--head", head, Head)
    path = Path(weights) if not is_url(weights) else local_weights(weights, cache_dir())
    for record in run(images, path, Architecture(model or "", img_size), head, max(1, topk), device):
        print(json.dumps(record))
        err.print(f"{record['image']}: " + (", ".join(f"{c} {p:.1%}" for c, p in record["top"])
                                            if "top" in record else record["error"]))


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
