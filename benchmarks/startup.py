"""Start-up at ImageNet scale: how long until the first training step, with and without the
stored index, on a generated tree.

The tree is ImageNet-shaped: 1,000 class folders, N training files and N / 25 val files (or
--val-files), made of hard links to a few dozen synthetic JPEGs of 375-500 px (--seed-px: the
disk holds the few, the file system lists the many; the bytes read are in the page cache, so
the figures are warm-cache figures). Measured, each in a fresh process: the first scan (every
header read), a start with the stored index (listing + stat only), a whole start to the first
training step with the stored index (data, a DeiT-tiny student, the torch loader's first
batch, one step), and `fastdeit train` itself, as a user types it, to its first metrics line;
the same on the tree prepared once with `prepare-data --max-side 0` (and that preparation's
time). Costs are also reported per 100,000 files, and projected linearly to ImageNet's
1,281,167 where the large tree is smaller.

    python benchmarks/startup.py --files 200000 --out benchmarks/results/startup-cpu-2core.json
    python benchmarks/startup.py --files 1281167 --val-files 50000 --seed-px 32,48 --scan-repeats 1  # ImageNet's count
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGENET_TRAIN = 1_281_167
CLASSES = 1000


def make_tree(root: Path, files: int, distinct: int = 48, classes: int = CLASSES,
              px: tuple[int, int] = (375, 500), val: int | None = None) -> Path:
    """train/ (`files`) and val/ (`val`, default 1/25 of it, at least one per class) with
    `classes` folders of hard links to `distinct` JPEGs of `px` (375-500 px: ImageNet's; made
    once)."""
    from fastdeit.data.synthetic import SyntheticSet, is_complete, write_synthetic

    val = max(classes, files // 25) if val is None else val
    marker = root / f".tree-{files}-{distinct}-{classes}-{px[0]}-{px[1]}-{val}"
    if marker.exists():
        return root
    seeds = root / "seeds"
    recipe = SyntheticSet(classes=2, train_per_class=distinct // 2, val_per_class=1, min_size=px[0], max_size=px[1])
    if not is_complete(seeds, recipe):
        write_synthetic(seeds, recipe)
    sources = sorted((seeds / "train").glob("*/*.jpg"))
    for split, count in (("train", files), ("val", val)):
        for k in range(count):
            folder = root / split / f"n{k % classes:08d}"
            if k < classes:
                folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{split}_{k:08d}.JPEG"
            if not target.exists():
                os.link(sources[k % len(sources)], target)
    marker.touch()
    return root


def _child(what: str, data: Path, cache: Path, img_size: int = 224) -> dict:
    """One measurement in a fresh process (nothing imported or scanned before it)."""
    code = f"""
import json, sys, time
t0 = time.perf_counter()
from fastdeit.data.folder import load_dataset
what, data, cache = {what!r}, {str(data)!r}, {str(cache)!r}
if what in ("scan", "indexed", "prepared"):
    train, val = load_dataset(data, cache_dir=cache)
    print(json.dumps({{"seconds": time.perf_counter() - t0, "train": len(train), "val": len(val)}}))
    sys.exit()
from fastdeit.training.build import build_run
from fastdeit.api import build_train_config
from fastdeit.config.schema import with_section
from fastdeit.runtime.distributed import SINGLE
from rich.console import Console
import os
cfg = build_train_config("deit", {{"data.path": data, "model.name": "deit_tiny", "run.out": cache + "/run",
    "run.batch_size": 64, "run.device": "cpu", "data.loader": "torch", "data.img_size": {img_size}}},
    ["data.workers=2", "run.progress=false", "sched.epochs=1", "sched.warmup_epochs=0"])
cfg = with_section(cfg, "run", cache_dir=cache)  # the stored index of the first scan
parts = build_run(cfg, SINGLE, Console(file=open(os.devnull, "w")))
t_built = time.perf_counter() - t0
batch = next(iter(parts.loaders.train(parts.data.train, 0, 0)))
t_batch = time.perf_counter() - t0
parts.step(batch, 1)
print(json.dumps({{"seconds": t_batch, "built_s": t_built, "first_step_done_s": time.perf_counter() - t0,
                  "train": len(parts.data.train)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else '?'}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _command(data: Path, cache: Path, img_size: int = 224) -> dict:
    """`fastdeit train` as a user types it, in a fresh process group, from its start to the first
    metrics line of a step; then stopped as a scheduler stops it (SIGTERM to the group)."""
    run = cache / "run-command"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "fastdeit", "train", "--data", str(data), "--model", "deit_tiny", "--epochs", "1",
           "--batch-size", "64", "--img-size", str(img_size), "--device", "cpu", "--loader", "torch", "--out", str(run),
           "--set", "run.log_every=1",
           "--set", "run.progress=false", "--set", "data.workers=2", "--set", "sched.warmup_epochs=0"]
    log = cache / "command.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                env={**os.environ, "FASTDEIT_CACHE": str(cache)})  # the stored index's folder
    from fastdeit.training.rundir import RunDir

    metrics = RunDir(run).metrics
    try:
        while not (metrics.exists() and '"kind": "step"' in metrics.read_text()):
            if proc.poll() is not None:
                raise SystemExit(f"fastdeit train ended before its first step: {log.read_text()[-500:]}")
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    return {"seconds": seconds}


def prepare(root: Path) -> tuple[Path, dict]:
    """The tree prepared with its bytes unchanged (`fastdeit prepare-data --max-side 0`: every
    file read, checked to decode at 1/8 scale, packed), made once; its wall time."""
    import time

    from fastdeit.data.preparing import PrepareOptions, prepare_data

    out = root.with_name(root.name + "-prepared")
    if (out / "manifest.json").exists():
        return out, json.loads((out / ".timing.json").read_text())
    t0 = time.perf_counter()
    prepare_data(root, out, PrepareOptions(max_side=0))
    timing = {"seconds": time.perf_counter() - t0, "workers": os.cpu_count()}
    (out / ".timing.json").write_text(json.dumps(timing))
    return out, timing


def measure(root: Path, prepared: Path, repeats: int, scan_repeats: int, img_size: int = 224) -> dict[str, dict]:
    """Each start `repeats` times (fresh processes), the first scan `scan_repeats` times (with
    a fresh cache each time: minutes at ImageNet's count); the run of median time is kept, with
    all the times."""
    runs: dict[str, list[dict]] = {}
    caches = [Path(tempfile.mkdtemp(prefix="fastdeit-startup-cache-")) for _ in range(scan_repeats)]
    for cache in caches:
        runs.setdefault("first scan (every header read)", []).append(_child("scan", root, cache))
    for k in range(repeats):
        cache = caches[k % len(caches)]  # holds the stored index of its first scan
        for name, what, data in (
                ("start with the stored index", "indexed", root),
                ("to the first training step, with the stored index", "first-step", root),
                ("fastdeit train to its first step, with the stored index", "command", root),
                ("a prepared data set (its index read)", "prepared", prepared),
                ("to the first training step, prepared data set", "first-step", prepared),
                ("fastdeit train to its first step, prepared data set", "command", prepared)):
            runs.setdefault(name, []).append(_command(data, cache, img_size) if what == "command"
                                             else _child(what, data, cache, img_size))
    out = {}
    for name, rs in runs.items():
        ordered = sorted(rs, key=lambda r: r["seconds"])
        out[name] = {**ordered[len(ordered) // 2], "all_seconds": [r["seconds"] for r in rs]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200_000, help="training files of the large generated tree")
    p.add_argument("--small", type=int, default=10_000,
                   help="training files of the small one (for the line; 0: none, costs per file through zero)")
    p.add_argument("--root", type=Path, default=None, help="where to generate them (default: a temp folder)")
    p.add_argument("--val-files", type=int, default=None, help="val files of the large tree (default: files / 25)")
    p.add_argument("--seed-px", default="375,500", help="MIN,MAX side of the generated JPEGs the trees link to")
    p.add_argument("--repeats", type=int, default=3, help="starts of each kind; the median is kept")
    p.add_argument("--scan-repeats", type=int, default=None, help="first scans (default: --repeats)")
    p.add_argument("--img-size", type=int, default=224, help="the training size of the starts that train a step")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    import torch

    from fastdeit.report.provenance import measured_on, write_results

    base = a.root or Path(tempfile.gettempdir()) / "fastdeit-startup"
    px = tuple(int(v) for v in a.seed_px.split(","))
    vals = {a.small: max(CLASSES, a.small // 25), a.files: a.val_files or max(CLASSES, a.files // 25)}
    trees = (a.small, a.files) if a.small else (a.files,)
    sizes = {k: make_tree(base / f"tree-{k}-{px[0]}-{px[1]}", k, px=px, val=vals[k]) for k in trees}
    made = {k: prepare(root) for k, root in sizes.items()}
    runs = {k: measure(root, made[k][0], a.repeats, a.scan_repeats or a.repeats, a.img_size)
            for k, root in sizes.items()}
    files = {k: k + vals[k] for k in sizes}
    for k in sizes:
        runs[k]["prepare-data --max-side 0 (once)"] = made[k][1]
    target = IMAGENET_TRAIN + 50_000  # at the large tree's count, the projection is the measurement
    rows = {}
    index_slope = 0.0
    for name in runs[a.files]:  # the index first: the whole start grows with the files through it
        small, big = (runs[a.small][name]["seconds"] if a.small else 0.0), runs[a.files][name]["seconds"]
        per_file = (big - small) / (files[a.files] - (files[a.small] if a.small else 0))
        index_slope = per_file if name in ("start with the stored index", "a prepared data set (its index read)") \
            else index_slope
        # From the large tree on. A whole start grows with the files through the index only
        # (the model, the loader and its first batch do not depend on the file count), and its
        # fixed costs (imports: 4-5 s on this machine) vary by a second or two between runs,
        # more than the files add: it goes on at the index's slope.
        slope = index_slope if name.startswith(("to the first", "fastdeit train")) else per_file
        rows[name] = {"seconds": {str(files[k]): runs[k][name]["seconds"] for k in sizes},
                      "details": {str(files[k]): runs[k][name] for k in sizes},
                      "per_100k_files_s": per_file * 1e5, "projection_slope_per_100k_s": slope * 1e5,
                      "projected_imagenet_s": big + slope * (target - files[a.files])}
    report = {"benchmark": "startup", **measured_on(torch.device("cpu")), "files": files,
              "tree": f"{CLASSES} classes of hard links to 48 synthetic {px[0]}-{px[1]} px JPEGs, val "
                      f"{vals[a.files]:,} at the large tree; warm page cache", "results": rows,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    for name, r in rows.items():
        print(f"{name}: " + ", ".join(f"{s:.1f} s at {n} files" for n, s in r["seconds"].items())
              + f"; {r['per_100k_files_s']:.2f} s per 100k files; ~{r['projected_imagenet_s']:.0f} s at ImageNet size")
    write_results(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
