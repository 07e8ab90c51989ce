"""The `fastdeit` command: parses, builds a TrainConfig, launches. No training logic here.

Bad input is one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fastdeit.config import TrainConfig, apply_overrides, recipe, validate, with_section
from fastdeit.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train DeiT students, with distillation through the distillation token, fast.")
err = Console(stderr=True, soft_wrap=True)  # log lines stay whole (paths are greppable)


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except UserError as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted: what was finished is on disk; the same command resumes where it can")
        raise typer.Exit(130) from None


def cache_dir() -> Path:
    """Where `fastdeit demo` keeps its generated data: $FASTDEIT_CACHE, else the XDG cache."""
    if os.environ.get("FASTDEIT_CACHE"):
        return Path(os.environ["FASTDEIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastdeit"


@app.command("make-data")
def make_data(
    out: Path = typer.Argument(..., help="Folder to write train/ and val/ into."),
    classes: int = typer.Option(10, help="Number of classes (2-10)."),
    train_per_class: int = typer.Option(300, help="Training images per class."),
    val_per_class: int = typer.Option(50, help="Validation images per class."),
    seed: int = typer.Option(0, help="Same seed, byte-identical files."),
) -> None:
    """Write the embedded synthetic data set (JPEG files in an ImageFolder tree)."""
    from fastdeit.data.synthetic import SyntheticSpec, write_synthetic

    def go() -> None:
        spec = SyntheticSpec(classes=classes, train_per_class=train_per_class,
                             val_per_class=val_per_class, seed=seed)
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} exists and is not a folder")
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("writing images", total=None)
            try:
                write_synthetic(out, spec, progress=lambda d, t: bar.update(task, completed=d, total=t))
            except ValueError as e:
                raise UserError(str(e)) from None
        err.print(f"wrote {classes * (train_per_class + val_per_class)} images to {out}")

    _guard(go)


@app.command()
def train(
    data: Path = typer.Option(None, help="ImageFolder root holding train/ and val/."),
    model: str = typer.Option(None, help="deit_tiny/small/base[_distilled] or any timm classifier."),
    out: Path = typer.Option(None, help="Run folder (config.json, metrics.jsonl, checkpoints, summary.json)."),
    recipe_name: str = typer.Option("deit", "--recipe", help="deit (the paper's ImageNet recipe) or demo."),
    epochs: int = typer.Option(None, help="Training epochs."),
    batch_size: int = typer.Option(None, help="Global batch size (split across ranks)."),
    img_size: int = typer.Option(None, help="Training and eval resolution."),
    lr: float = typer.Option(None, help="Learning rate at batch 512; scaled by batch_size/512."),
    distill: str = typer.Option(None, help="none | soft | hard."),
    alpha: float = typer.Option(None, help="Weight of the distillation loss."),
    tau: float = typer.Option(None, help="Temperature of soft distillation."),
    teacher: str = typer.Option(None, help="Teacher model name (timm)."),
    teacher_ckpt: Path = typer.Option(None, help="Teacher weights: a fastdeit checkpoint or a state_dict."),
    targets: str = typer.Option(None, help="live | replay | labelmap: where teacher targets come from."),
    teacher_cache: Path = typer.Option(None, help="Cache folder for --targets replay|labelmap."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    loader: str = typer.Option(None, help="dali | torch | auto (dali when CUDA and DALI are available)."),
    seed: int = typer.Option(None, help="Seed of the augmentation plan and the initialisation."),
    resume: str = typer.Option(None, help="Resume from this checkpoint; `--resume` alone: OUT/checkpoint-last.pt "
                               "if there is one, else start (so a requeued job needs no other flags)."),
    attn: str = typer.Option(None, help="Attention backend: auto | sdpa | flex | triton | math."),
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

    def go() -> None:
        from fastdeit.dist import in_torchrun
        from fastdeit.launch import SUMMARY_KEYS, Launch, launch, run_worker
        from fastdeit.launch import check as check_launch
        from fastdeit.trainer import Trainer

        spec = None
        if gpus is not None:
            spec = Launch(gpus=gpus, procs=procs, nodes=nodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                          max_restarts=max_restarts)
            if device not in (None, "auto", spec.device):
                raise UserError(f"--device {device} contradicts --gpus {gpus} (which means {spec.device}): drop one")
        elif procs != 1 or nodes != 1 or rdzv_endpoint or max_restarts:
            raise UserError("--procs, --nodes, --rdzv-endpoint and --max-restarts go with --gpus N "
                            "(use --gpus 0 for CPU workers)")
        cfg = build_train_config(recipe_name, data=data, model=model, out=out, epochs=epochs,
                                 batch_size=batch_size, img_size=img_size, lr=lr, distill=distill, alpha=alpha,
                                 tau=tau, teacher=teacher, teacher_ckpt=teacher_ckpt,
                                 device=spec.device if spec else device, seed=seed, loader=loader, targets=targets,
                                 teacher_cache=teacher_cache, attn=attn, compile_mode=compile_mode,
                                 ckpt_every=ckpt_every, overrides=overrides)
        path = None
        if resume:
            path = Path(cfg.run.out) / "checkpoint-last.pt" if resume == "auto" else Path(resume)
        if resume == "auto" and not path.exists():  # a requeued job's first submission: start fresh
            err.print(f"--resume: no checkpoint in {cfg.run.out} yet; starting the run")
            path = None
        if spec is not None and not in_torchrun():
            check_launch(spec, cfg)
        if in_torchrun():  # started by torchrun or a scheduler: this process is one rank
            summary = run_worker(cfg, path)
        elif spec is not None and (spec.world > 1 or spec.nodes > 1 or spec.max_restarts > 0):
            launch(cfg, spec, path, err)  # rank 0 prints the summary line
            return
        else:
            summary = Trainer(cfg, err).fit(resume=path)
        if summary is not None:
            print(json.dumps({k: summary[k] for k in SUMMARY_KEYS}))

    _guard(go)


def build_train_config(recipe_name: str, *, data: Path | None, model: str | None, out: Path | None,
                       overrides: list[str], **flags: Any) -> TrainConfig:
    """Recipe, then flags, then --set overrides; validated."""
    cfg = recipe(recipe_name)
    cfg = with_section(cfg, "data", path=str(data) if data else None, img_size=flags["img_size"],
                       loader=flags["loader"])
    cfg = with_section(cfg, "model", name=model, attn=flags.get("attn"))
    cfg = with_section(cfg, "sched", epochs=flags["epochs"])
    cfg = with_section(cfg, "optim", lr=flags["lr"])
    cfg = with_section(cfg, "distill", mode=flags["distill"], alpha=flags["alpha"], tau=flags["tau"],
                       teacher=flags["teacher"], targets=flags.get("targets"),
                       teacher_ckpt=str(flags["teacher_ckpt"]) if flags["teacher_ckpt"] else None,
                       teacher_cache=str(flags["teacher_cache"]) if flags.get("teacher_cache") else None)
    cfg = with_section(cfg, "run", out=str(out) if out else None, batch_size=flags["batch_size"],
                       device=flags["device"], seed=flags["seed"], compile=flags.get("compile_mode"),
                       ckpt_every=flags.get("ckpt_every"),
                       cache_dir=str(cache_dir()))
    cfg = apply_overrides(cfg, overrides)
    if not cfg.data.path:
        raise UserError("--data DIR is required (make one with: fastdeit make-data DIR)")
    if not cfg.run.out:
        raise UserError("--out RUN is required: the run folder to write")
    validate(cfg)
    return cfg


@app.command("cache-teacher")
def cache_teacher(
    data: Path = typer.Option(None, help="ImageFolder root holding train/ and val/."),
    teacher: str = typer.Option(None, help="Teacher model name (timm); read from a fastdeit checkpoint if omitted."),
    teacher_ckpt: Path = typer.Option(None, help="Teacher weights."),
    out: Path = typer.Option(None, help="The cache folder (created; a killed build resumes in it)."),
    mode: str = typer.Option("replay", help="replay (exact, per epoch) | labelmap (one pass per image)."),
    epochs: int = typer.Option(None, help="replay: cover epochs 0..E-1 (default: the recipe's)."),
    topk: int = typer.Option(None, help="Logits (replay) or class scores per cell (labelmap) to keep."),
    recipe_name: str = typer.Option("deit", "--recipe", help="The plan's recipe: it must be the training run's."),
    batch_size: int = typer.Option(None, help="Global batch of the training runs (part of the plan)."),
    img_size: int = typer.Option(None, help="Training resolution (part of the plan)."),
    seed: int = typer.Option(None, help="The training runs' seed (part of the plan)."),
    device: str = typer.Option(None, help="auto | cpu | cuda."),
    loader: str = typer.Option(None, help="dali | torch | auto."),
    verify_batches: int = typer.Option(0, "--verify", help="Instead of building: re-run the teacher on N cached "
                                                             "batches and report the agreement."),
    overrides: list[str] = typer.Option([], "--set", help="section.key=value (repeatable), as for train."),
) -> None:
    """Cache the teacher's targets on disk, so that distillation runs read instead of computing them."""

    def go() -> None:
        from fastdeit.caching import build_labelmap, build_replay, verify
        from fastdeit.data.folder import load_dataset
        from fastdeit.loaders import read_skip_list

        if mode not in ("replay", "labelmap"):
            raise UserError(f"--mode must be replay or labelmap, got {mode!r}")
        if out is None:
            raise UserError("--out CACHE is required: the cache folder")
        if not (teacher or teacher_ckpt):
            raise UserError("cache-teacher needs a teacher: --teacher NAME and/or --teacher-ckpt PATH")
        cfg = build_train_config(recipe_name, data=data, model=None, out=out, epochs=epochs, batch_size=batch_size,
                                 img_size=img_size, lr=None, distill="hard", alpha=None, tau=None, teacher=teacher,
                                 teacher_ckpt=teacher_ckpt, device=device, seed=seed, loader=loader,
                                 overrides=[*overrides, *([f"distill.topk={topk}"] if topk else [])])
        train, _ = read_skip_list(cfg.data.skip_list, *load_dataset(cfg.data.path))
        if verify_batches:
            agreement = verify(cfg, train, out, verify_batches, err)
            err.print(f"{verify_batches} batches re-run: {agreement:.2%} of the cached hard labels equal the "
                      f"live teacher's")
            print(json.dumps({"verify_batches": verify_batches, "agreement": agreement}))
            return
        if mode == "replay":
            manifest = build_replay(cfg, train, out, cfg.sched.epochs, err)
        else:
            manifest = build_labelmap(cfg, train, out, err)
        err.print(f"teacher cache ready in {out} ({mode}, {manifest['teacher']})")

    _guard(go)


@app.command("check-data")
def check_data(
    data: Path = typer.Argument(..., help="ImageFolder root holding train/ and val/."),
    out: Path = typer.Option(None, help="Also write the list to this file (for --set data.skip_list=FILE)."),
) -> None:
    """Decode every image once (fast: JPEGs at 1/8 scale) and list the unreadable ones."""
    from fastdeit.data.folder import find_unreadable, load_dataset

    def go() -> None:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("reading headers", total=None)
            train, val = load_dataset(data, progress=lambda d, t: bar.update(task, completed=d, total=t))
            bad = []
            for split, index in (("train", train), ("val", val)):
                task = bar.add_task(f"decoding {split}", total=len(index))
                rows = find_unreadable(index, progress=lambda d, t, task=task: bar.update(task, completed=d))
                bad += [f"{split}/{index.paths[i]}" for i in rows]
        for line in bad:
            print(line)
        if out is not None:
            out.write_text("".join(f"{line}\n" for line in bad))
        total = len(train) + len(val)
        err.print(f"{len(bad)} unreadable of {total} images" +
                  (f"; skip them with --set data.skip_list={out}" if out is not None and bad else ""))

    _guard(go)


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., help="ImageFolder root; its val/ split is evaluated."),
    ckpt: Path = typer.Option(..., help="A fastdeit checkpoint (checkpoint-best.pt or -last.pt)."),
    head: str = typer.Option("joint", help="joint | cls | dist (distilled models have all three)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    batch_size: int = typer.Option(256, help="Eval batch size."),
    workers: int = typer.Option(2, help="Loader processes."),
    ema: bool = typer.Option(False, help="Evaluate the EMA weights."),
    loader: str = typer.Option("auto", help="dali | torch | auto."),
) -> None:
    """Top-1 / top-5 on the val split, plus img/s."""

    def go() -> None:
        from fastdeit.evaluation import evaluate_checkpoint

        if head not in ("joint", "cls", "dist"):
            raise UserError(f"--head must be joint, cls or dist, got {head!r}")
        if loader not in ("auto", "dali", "torch"):
            raise UserError(f"--loader must be auto, dali or torch, got {loader!r}")
        res = evaluate_checkpoint(ckpt, data, device, batch_size, workers, ema, loader)
        if head not in res.heads:
            raise UserError(f"--head {head}: this model has only the joint head (not distilled)")
        table = Table(title=f"{ckpt}")
        for col in ("head", "top-1", "top-5", "images", "img/s"):
            table.add_column(col)
        table.add_row(head, f"{res.top1(head):.2f}", f"{res.top5(head):.2f}", str(res.n), f"{res.img_s:.0f}")
        Console(stderr=True).print(table)
        if res.bad:
            err.print(f"[yellow]warning:[/] {res.bad} unreadable val images were left out")
        print(json.dumps({"head": head, "top1": res.top1(head), "top5": res.top5(head), "images": res.n,
                          "img_s": res.img_s, "unreadable": res.bad}))

    _guard(go)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Folder for the three runs and summary.json."),
    data: Path = typer.Option(None, help="Where the synthetic data lives (default: the fastdeit cache)."),
) -> None:
    """Generate the synthetic data, train a teacher, a DeiT-tiny and a distilled DeiT-tiny."""

    def go() -> None:
        from fastdeit.demo import run_demo

        run_demo(out, data or cache_dir() / "synthetic-v1", err)

    _guard(go)


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
