"""Start-up at ImageNet scale: how long until the first training step, with and without the
stored index, on a generated tree.

The tree is ImageNet-shaped: 1,000 class folders, N training files and N / 25 val files, made
of hard links to a few dozen synthetic 375-500 px JPEGs (the disk holds the few, the file
system lists the many; the bytes read are in the page cache, so the figures are warm-cache
figures). Measured, each in a fresh process: the first scan (every header read), a start with
the stored index (listing + stat only), and a whole start to the first training step with the
stored index (data, a DeiT-tiny student, the torch loader's first batch, one step). Costs are
also reported per 100,000 files and projected linearly to ImageNet's 1,281,167.

    python benchmarks/startup.py --files 200000 --out benchmarks/results/startup-cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

IMAGENET_TRAIN = 1_281_167
CLASSES = 1000


def make_tree(root: Path, files: int, distinct: int = 48) -> Path:
    """train/ and val/ with CLASSES folders of hard links to `distinct` JPEGs (made once)."""
    from fastdeit.data.synthetic import SyntheticSet, is_complete, write_synthetic

    marker = root / f".tree-{files}"
    if marker.exists():
        return root
    seeds = root / "seeds"
    recipe = SyntheticSet(classes=2, train_per_class=distinct // 2, val_per_class=1, min_size=375, max_size=500)
    if not is_complete(seeds, recipe):
        write_synthetic(seeds, recipe)
    sources = sorted((seeds / "train").glob("*/*.jpg"))
    for split, count in (("train", files), ("val", max(CLASSES, files // 25))):
        for k in range(count):
            folder = root / split / f"n{k % CLASSES:08d}"
            if k < CLASSES:
                folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{split}_{k:08d}.JPEG"
            if not target.exists():
                os.link(sources[k % len(sources)], target)
    marker.touch()
    return root


def _child(what: str, data: Path, cache: Path) -> dict:
    """One measurement in a fresh process (nothing imported or scanned before it)."""
    code = f"""
import json, sys, time
t0 = time.perf_counter()
from fastdeit.data.folder import load_dataset
what, data, cache = {what!r}, {str(data)!r}, {str(cache)!r}
if what in ("scan", "indexed"):
    train, val = load_dataset(data, cache_dir=cache)
    print(json.dumps({{"seconds": time.perf_counter() - t0, "train": len(train), "val": len(val)}}))
    sys.exit()
from fastdeit.build import build_run
from fastdeit.cli import build_train_config
from fastdeit.config import with_section
from fastdeit.dist import SINGLE
from rich.console import Console
import os
cfg = build_train_config("deit", {{"data.path": data, "model.name": "deit_tiny", "run.out": cache + "/run",
    "run.batch_size": 64, "run.device": "cpu", "data.loader": "torch"}},
    ["data.workers=2", "run.progress=false", "sched.epochs=1", "sched.warmup_epochs=0"])
cfg = with_section(cfg, "run", cache_dir=cache)  # the stored index of the first scan
parts = build_run(cfg, SINGLE, Console(file=open(os.devnull, "w")))
t_built = time.perf_counter() - t0
batch = next(iter(parts.loaders.train(parts.data.train, 0, 0)))
parts.step(batch, 1)
print(json.dumps({{"seconds": time.perf_counter() - t0, "built_s": t_built, "train": len(parts.data.train)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else '?'}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200_000, help="training files of the generated tree")
    p.add_argument("--root", type=Path, default=None, help="where to generate it (default: a temp folder)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    import torch

    from fastdeit.provenance import measured_on, write_report

    root = make_tree(a.root or Path(tempfile.gettempdir()) / "fastdeit-startup", a.files)
    cache = Path(tempfile.mkdtemp(prefix="fastdeit-startup-cache-"))
    rows = {"first scan (every header read)": _child("scan", root, cache),
            "start with the stored index": _child("indexed", root, cache),
            "to the first training step, with the stored index": _child("first-step", root, cache)}
    n = rows["first scan (every header read)"]["train"] + rows["first scan (every header read)"]["val"]
    scale = (IMAGENET_TRAIN * 26 / 25) / n  # train + val, as the tree
    for r in rows.values():
        r["per_100k_files_s"] = r["seconds"] / n * 1e5 if "val" in r else None
        r["projected_imagenet_s"] = r["seconds"] * scale if "val" in r else None
    report = {"benchmark": "startup", **measured_on(torch.device("cpu")), "files": n,
              "tree": f"{a.files} train + {n - a.files} val hard links to 48 synthetic 375-500 px JPEGs, "
                      f"{CLASSES} classes; warm page cache", "results": rows,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    for name, r in rows.items():
        extra = f", {r['per_100k_files_s']:.1f} s per 100k files, ~{r['projected_imagenet_s']:.0f} s at ImageNet size" \
            if r.get("per_100k_files_s") else ""
        print(f"{name}: {r['seconds']:.1f} s{extra}")
    write_report(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
