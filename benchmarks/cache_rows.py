"""A teacher cache's row lookup at ImageNet's row count: host ms per batch, by shard layout.

    python benchmarks/cache_rows.py [--rows 128116,1281167] [--batches 1024,128]
                                    [--shard-rows 4096,labelmap] [--out FILE]

A label map's batch asks for the rows of its images, which are spread over the whole cache:
`CacheReader.rows` costs a gather per shard touched. Each case writes a cache of ImageNet's
label map records (7 x 7 cells, top-5 of 1,000 classes: 980 bytes a row) with the real
writer, in shards of 4,096 rows (fastdeit's label maps before) or of the size the build picks
now (`labelmap`: `labelmap_shard_rows`), then times `rows` on random batches of the global
batch of one GPU (1,024) and of one of 8 ranks (128). The cache is read from the page cache
(warmed by one pass over the batches): what a run's steady state pays, not the disk.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fastdeit.distill.cache_build import labelmap_shard_rows
from fastdeit.distill.cache_format import CacheReader, CacheWriter, dtype_text
from fastdeit.distill.sources import labelmap_dtype
from fastdeit.report.provenance import measured_on, write_results

CLASSES, CELLS, TOPK = 1000, 49, 5  # a convnet teacher's 7 x 7 map at 224 px, top-5 kept


def write_cache(root: Path, rows: int, shard_rows: int, dtype: np.dtype) -> None:
    """A cache of `rows` records of random classes and scores, written shard by shard."""
    writer = CacheWriter(root, {"format": 2, "mode": "labelmap", "shard_rows": shard_rows,
                                "record_dtype": dtype_text(dtype)}, dtype)
    rng = np.random.default_rng(0)
    for k in range(-(-rows // shard_rows)):
        n = min(shard_rows, rows - k * shard_rows)
        rec = np.empty(n, dtype)
        rec["idx"] = rng.integers(0, CLASSES, rec["idx"].shape)
        rec["val"] = rng.random(rec["val"].shape, np.float32)
        writer.write_shard(k, rec)


def time_rows(root: Path, rows: int, batch: int, draws: int) -> dict[str, Any]:
    """Median and mean ms of `rows` over `draws` random batches, after one untimed pass."""
    reader = CacheReader(root)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, rows, batch) for _ in range(draws)]
    for b in batches:  # maps every shard and warms the page cache
        reader.rows(b)
    seconds = []
    for b in batches:
        t0 = time.perf_counter()
        reader.rows(b)
        seconds.append(time.perf_counter() - t0)
    touched = statistics.fmean(len(np.unique(b // reader.shard_rows)) for b in batches)
    return {"ms_per_batch": statistics.median(seconds) * 1e3, "ms_per_batch_mean": statistics.fmean(seconds) * 1e3,
            "shards": -(-rows // reader.shard_rows), "shards_touched": touched}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="128116,1281167", help="comma-separated cache sizes, in rows")
    p.add_argument("--batches", default="1024,128", help="comma-separated batch sizes (rows a lookup asks for)")
    p.add_argument("--shard-rows", default="4096,labelmap",
                   help="comma-separated shard layouts: rows per shard, or 'labelmap' (the build's choice)")
    p.add_argument("--draws", type=int, default=200, help="timed batches per case")
    p.add_argument("--root", type=Path, default=None, help="where the caches go (default: a temp folder)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    console = Console(stderr=True)
    dtype = labelmap_dtype(TOPK, CLASSES, CELLS)
    work = Path(tempfile.mkdtemp(prefix="fastdeit-cache-rows-", dir=a.root))
    rows_out: list[dict[str, Any]] = []
    report = {"benchmark": "cache_rows", **measured_on(torch.device("cpu")),
              "settings": {"record": f"label map, {CELLS} cells x top-{TOPK} of {CLASSES} classes",
                           "record_bytes": dtype.itemsize, "draws": a.draws},
              "command": " ".join(["cache_rows.py", *(argv if argv is not None else sys.argv[1:])]), "rows": rows_out}
    try:
        for rows in (int(v) for v in a.rows.split(",")):
            for layout in a.shard_rows.split(","):
                shard_rows = labelmap_shard_rows(work / "none", dtype, 65536) if layout == "labelmap" else int(layout)
                root = work / f"{rows}-{shard_rows}"
                console.print(f"{rows:,} rows in shards of {shard_rows:,}: writing ...")
                write_cache(root, rows, shard_rows, dtype)
                for batch in (int(v) for v in a.batches.split(",")):
                    rows_out.append({"rows": rows, "layout": layout, "shard_rows": shard_rows, "batch": batch,
                                     **time_rows(root, rows, batch, a.draws)})
                    write_results(report, a.out)  # a run cut short keeps what it measured
                shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"CacheReader.rows, {report['device']}")
    for col in ("rows", "shard rows", "shards", "batch", "shards touched", "ms per batch"):
        table.add_column(col, justify="right")
    for r in rows_out:
        table.add_row(f"{r['rows']:,}", f"{r['shard_rows']:,}", str(r["shards"]), str(r["batch"]),
                      f"{r['shards_touched']:.0f}", f"{r['ms_per_batch']:.3f}")
    Console(width=160).print(table)
    write_results(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
