"""`fastdeit prepare-data SRC OUT`: store an ImageFolder tree once, shrunk to what training
needs, in a few large tar files (the format is data/prepared.py's).

Work is cut into shards of `shard_rows` consecutive source rows; each shard is a pure
function of its rows and the options, built by one process (tar to a temporary name,
renamed, then its row table). A killed build resumes at the shards without a table and
ends byte-identical to an uninterrupted one. `job.json` (the request) is written first and a
resumed build must match it; the split indexes and `manifest.json` are written last.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastdeit.data import prepared
from fastdeit.data.folder import ImageIndex, scan_split
from fastdeit.errors import Requeue, Stopped, UserError, differences
from fastdeit.pipelines.reference import to_rgb
from fastdeit.runtime.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from fastdeit.runtime.signals import REQUEUE, quiet_worker, requested, workers_start_quiet

SPLITS = ("train", "val")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class PrepareOptions:
    max_side: int = 512  # longest side of a stored image; 0: store the source bytes unchanged
    quality: int = 90  # JPEG quality of re-encoded images
    shard_rows: int = 4096  # source rows per tar file
    workers: int = 0  # processes; 0: one per CPU core

    def check(self) -> None:
        if self.max_side != 0 and self.max_side < 16:
            raise UserError(f"--max-side {self.max_side}: use 0 (keep the source bytes) or at least 16 px")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality {self.quality} is not in 1..100 (90 is a good choice)")
        if self.shard_rows < 1 or self.workers < 0:
            raise UserError("--shard-rows must be >= 1 and --workers >= 0")


def encode(data: bytes, max_side: int, quality: int) -> tuple[bytes, int, int] | None:
    """(bytes to store, width, height) of one source image; None when it does not decode.
    Sources within `max_side` that are JPEGs (all sources with max_side 0) keep their bytes,
    checked to decode; the others are resized (longest side = max_side) and stored as JPEG."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if max_side == 0 or (max(w, h) <= max_side and img.format == "JPEG"):
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # every byte read, decoded at 1/8 scale
                img.load()
                return data, w, h
            scale = min(1.0, max_side / max(w, h))
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img.draft("RGB", size)  # JPEG: decode at the smallest DCT scale still >= size
            rgb = to_rgb(img)  # as the pipelines decode it (16-bit gray scaled, not clipped)
            if rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.LANCZOS)
            out = io.BytesIO()
            rgb.save(out, "JPEG", quality=quality)
            return out.getvalue(), size[0], size[1]
    except DECODE_ERRORS:
        return None


def member_name(path: str, data: bytes) -> str:
    """A row's name in its tar: its source path, plus `.jpg` where the stored bytes are a
    re-encoded JPEG under another extension (standard tools then open it as one)."""
    jpeg = data[:3] == b"\xff\xd8\xff"
    return path + ".jpg" if jpeg and not path.lower().endswith((".jpg", ".jpeg")) else path


@dataclass(frozen=True)
class ShardJob:
    source: Path  # the split folder of the tree
    folder: Path  # the split folder of the prepared set
    number: int
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    max_side: int
    quality: int


def _table(folder: Path, number: int) -> Path:
    return folder / prepared.shard_name(number).replace(".tar", ".json")


def build_shard(job: ShardJob) -> int:
    """Write one tar and its row table; returns the rows handled."""
    rows, left_out = [], []

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for path, label in zip(job.paths, job.labels):
                try:
                    data = (job.source / path).read_bytes()
                except OSError as e:
                    left_out.append([path, f"cannot be read ({e.strerror or e})"])
                    continue
                stored = encode(data, job.max_side, job.quality)
                if stored is None:
                    left_out.append([path, "does not decode"])
                    continue
                blob, w, h = stored
                info = tarfile.TarInfo(member_name(path, blob))  # no owner, no time: the same bytes every build
                info.size = len(blob)
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(blob))
                start = tar.offset - -(-len(blob) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # data, padded, ends here
                rows.append([path, label, w, h, start, len(blob), zlib.crc32(blob)])

    tar_path = job.folder / prepared.shard_name(job.number)
    atomic_write(tar_path, write)
    table = {"shard": job.number, "tar_bytes": tar_path.stat().st_size, "rows": rows, "left_out": left_out}
    atomic_write_text(json.dumps(table), _table(job.folder, job.number))
    return len(job.paths)


def _finished(folder: Path, number: int) -> dict[str, Any] | None:
    """The row table of a finished shard (its tar whole), else None."""
    try:
        table = json.loads(_table(folder, number).read_text())
        if (folder / prepared.shard_name(number)).stat().st_size == table["tar_bytes"]:
            return table
    except (OSError, ValueError, KeyError):
        pass
    return None


def _start(src: Path, out: Path, opts: PrepareOptions, indexes: dict[str, ImageIndex]) -> None:
    """Check OUT and record the request (job.json); a resumed build must make the same one."""
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError(f"OUT {out} is inside SRC {src}: pick an OUT outside the tree")
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file: pick another OUT")
    job = {"format": prepared.FORMAT, "version": prepared.VERSION, "max_side": opts.max_side,
           "quality": opts.quality, "shard_rows": opts.shard_rows,
           "source": {s: {"fingerprint": ix.fingerprint(), "rows": len(ix)} for s, ix in indexes.items()}}
    if (out / prepared.JOB).is_file():
        old = json.loads((out / prepared.JOB).read_text())
        if old != job:
            key, a, b = differences(old, job)[0]
            raise UserError(f"{out} holds a preparation of another request ({key}: {a} there, {b} now): "
                            f"pick another OUT, or repeat that request to finish it")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"OUT {out} exists and is not a prepared data set: pick another OUT")
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        for tmp in (out / split).glob("*.tmp"):  # what a killed build was writing
            tmp.unlink()
    atomic_write_text(json.dumps(job, indent=1), out / prepared.JOB)


def _jobs(index: ImageIndex, folder: Path, opts: PrepareOptions) -> list[ShardJob]:
    n = opts.shard_rows
    return [ShardJob(index.root, folder, k // n, index.paths[k:k + n], tuple(int(v) for v in index.labels[k:k + n]),
                     opts.max_side, opts.quality) for k in range(0, len(index), n)]


def _finish_split(index: ImageIndex, folder: Path, shards: int) -> dict[str, Any]:
    """Write the split's index from its shards' tables; its manifest entry."""
    tables = [_finished(folder, k) for k in range(shards)]
    missing = [k for k, t in enumerate(tables) if t is None]
    if missing:
        raise RuntimeError(f"shard {missing[0]} of {folder} was not written")
    rows = [r for t in tables for r in t["rows"]]
    table = np.zeros(len(rows), prepared.ROW_DTYPE)
    shard_of = np.repeat(np.arange(shards), [len(t["rows"]) for t in tables])
    if rows:
        _, table["label"], table["width"], table["height"], table["offset"], table["length"], table["crc32"] = \
            (np.array(c) for c in zip(*rows))
    table["shard"] = shard_of
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add .npy to a path
            np.save(f, table, allow_pickle=False)

    atomic_write(folder / "index.npy", save)
    # A name that is not UTF-8 keeps its bytes (surrogateescape, as os.fsencode); prepared.py reads it back.
    atomic_write_bytes("\n".join(r[0] for r in rows).encode("utf-8", "surrogateescape"), folder / "paths.txt")
    return {"classes": list(index.classes), "rows": len(rows), "shards": shards,
            "bytes": int(sum(t["tar_bytes"] for t in tables)), "left_out": [x for t in tables for x in t["left_out"]]}


def prepare_data(src: Path, out: Path, opts: PrepareOptions, progress: Callable[[int, int], None] | None = None,
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """Prepare (or finish preparing) SRC into OUT; returns the manifest."""
    opts.check()
    if prepared.is_prepared(src):
        raise UserError(f"SRC {src} is already a prepared data set: pass the ImageFolder tree it was made from")
    indexes = {s: scan_split(src, s, cache_dir=cache_dir) for s in SPLITS}
    if any("\n" in p for ix in indexes.values() for p in ix.paths):
        raise UserError(f"a file name under {src} holds a line break: rename it, then prepare again")
    _start(src, out, opts, indexes)
    jobs = {s: _jobs(ix, out / s, opts) for s, ix in indexes.items()}
    todo = [j for s in SPLITS for j in jobs[s] if _finished(j.folder, j.number) is None]
    total = sum(len(ix) for ix in indexes.values())
    done = total - sum(len(j.paths) for j in todo)
    if progress is not None:
        progress(done, total)
    if todo:
        _build_shards(todo, opts, done, total, progress)
    manifest = {**json.loads((out / prepared.JOB).read_text()),
                "splits": {s: _finish_split(indexes[s], out / s, len(jobs[s])) for s in SPLITS}}
    atomic_write_text(json.dumps(manifest, indent=1), out / prepared.MANIFEST)
    return manifest


def _build_shards(todo: list[ShardJob], opts: PrepareOptions, done: int, total: int,
                  progress: Callable[[int, int], None] | None) -> None:
    """Build the shards in worker processes; on a stop request (runtime/signals.py) the shards being
    written are finished, the rest left for the next start (Stopped)."""
    pool = ProcessPoolExecutor(max_workers=min(len(todo), opts.workers or os.cpu_count() or 1),
                               initializer=quiet_worker)
    try:
        with workers_start_quiet():
            futures = [pool.submit(build_shard, j) for j in todo]
        finished = 0
        for fut in as_completed(futures):
            done, finished = done + fut.result(), finished + 1
            if progress is not None:
                progress(done, total)
            if reason := requested():
                pool.shutdown(wait=True, cancel_futures=True)
                left = sum(1 for f in futures if not f.done() or f.cancelled())
                raise (Requeue if reason == REQUEUE else Stopped)(
                    f"stopped with {left} of {len(todo)} shards left; the same command continues") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C twice: the workers die with this process


def summary(manifest: dict[str, Any], out: Path) -> tuple[list[str], dict[str, Any]]:
    """What `prepare-data` prints: lines for the user (the first 20 sources left out, the
    totals) and its JSON result."""
    splits = manifest["splits"]
    left = [f"{s}/{p}: {why}" for s, info in splits.items() for p, why in info["left_out"]]
    counts = " and ".join(f"{v['rows']} {s}" for s, v in splits.items())
    total = sum(v["bytes"] for v in splits.values()) / 2**20
    lines = [f"left out {line}" for line in left[:20]]
    lines.append(f"prepared {counts} images in {out} ({total:.0f} MiB); {len(left)} left out"
                 + (f" (all listed in {out}/{prepared.MANIFEST})" if len(left) > 20 else ""))
    result = {s: {k: v[k] for k in ("rows", "shards", "bytes")} | {"left_out": len(v["left_out"])}
              for s, v in splits.items()}
    return lines, result
