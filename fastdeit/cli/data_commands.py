"""The data commands of `fastdeit`: make-data, index, prepare-data, check-data."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import Progress

from fastdeit.cli.base import app, command, err
from fastdeit.config.schema import Loader, check_choice
from fastdeit.errors import UserError
from fastdeit.runtime.atomic import atomic_write_text
from fastdeit.runtime.cache_folder import cache_dir


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
    from fastdeit.data.preparing import PrepareOptions, summary
    from fastdeit.data.preparing import prepare_data as run
    from fastdeit.runtime.signals import StopSignal, say

    with StopSignal(lambda _: say("stopping after the shards being written (Ctrl-C again to stop at once)")), \
            Progress(console=err, transient=True) as bar:
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
    data: Path = typer.Argument(..., help="ImageFolder root (train/, val/) or a prepared data set."),
    out: Path = typer.Option(None, help="Also write the list to this file (for --set data.skip_list=FILE)."),
    loader: str = typer.Option("auto", help="The decoders to try: torch (PIL) | dali | auto (both where DALI is "
                               "installed: each refuses files the other reads)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda: where DALI decodes."),
) -> None:
    """Decode every image once and list the ones a decoder refuses (a skip list)."""
    from fastdeit.data.folder import load_dataset
    from fastdeit.data.loaders import check_decoders, find_undecodable, skip_line
    from fastdeit.runtime.device import resolve_device

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
    bad = [skip_line(path) for path in bad]  # a name holding a newline or non-UTF-8 bytes: quoted
    for line in bad:
        print(line)
    if out is not None:
        atomic_write_text("".join(f"{line}\n" for line in bad), out)
    err.print(f"{len(bad)} unreadable of {len(train) + len(val)} images ("
              + ", ".join(f"{d} refused {n}" for d, n in refused.items()) + ")"
              + (f"; skip them with --set data.skip_list={out}" if out is not None and bad else ""))
