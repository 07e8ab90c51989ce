"""The on-disk teacher cache: manifest, shard writer, shard reader, validation.

A cache is a folder:

    manifest.json         what the cache is for (mode, teacher, data, plan, ...), written first
    shard-00000.npy       fixed-size blocks of rows (a structured numpy array, memory-mapped
    shard-00000.sha256    when read); its checksum, written after the shard is in place

Shards are written to a temporary name and renamed, then their checksum; a shard without a
checksum file is unfinished and never read, so a killed build resumes at the first missing
shard. Opening a cache compares its manifest with what the run expects and names the first
thing that differs: the cache never hands out a target for another teacher, data set, plan or
epoch. A shard is checked against its checksum the first time it is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastdeit.config import CacheMode, TrainConfig
from fastdeit.data.folder import ImageIndex
from fastdeit.errors import UserError
from fastdeit.plan import PlanSpec
from fastdeit.rundir import atomic_write, atomic_write_bytes

FORMAT = 1
MANIFEST = "manifest.json"
# Keys that say what the rows mean: a run and a cache must agree on all of them.
IDENTITY_KEYS = ("format", "mode", "teacher", "teacher_sha256", "dataset", "num_classes", "plan", "topk",
                 "amp", "shard_rows", "record_dtype", "labelmap_size")


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and bytes, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def replay_dtype(topk: int, num_classes: int) -> np.dtype:
    """One row per (epoch, position): the teacher's argmax, its top-k logits (fp16) and their
    class indices, and the logsumexp of all logits (to rebuild probabilities)."""
    index = "<i2" if num_classes <= np.iinfo(np.int16).max else "<i4"
    return np.dtype([("label", "<i4"), ("idx", index, (topk,)), ("val", "<f2", (topk,)), ("lse", "<f4")])


def labelmap_dtype(topk: int, num_classes: int, cells: int) -> np.dtype:
    """One row per image: top-k class scores (fp16) and indices at every cell of the map."""
    index = "<i2" if num_classes <= np.iinfo(np.int16).max else "<i4"
    return np.dtype([("idx", index, (cells, topk)), ("val", "<f2", (cells, topk))])


def dtype_text(dtype: np.dtype) -> str:
    return str(dtype.descr)


def identity(cfg: TrainConfig, mode: CacheMode, index: ImageIndex, teacher: nn.Module) -> dict[str, Any]:
    """What a cache's rows mean; a run and its cache must agree on every key."""
    d = cfg.distill
    name = d.teacher or getattr(teacher, "fastdeit_name", type(teacher).__name__)
    out = {"format": FORMAT, "mode": mode, "teacher": name, "teacher_sha256": weights_sha256(teacher.state_dict()),
           "dataset": index.fingerprint(), "num_classes": len(index.classes)}
    if mode == "replay":
        out["plan"] = PlanSpec.from_config(cfg).to_json()
    else:
        out["labelmap_size"] = d.labelmap_size or cfg.data.img_size
    return json.loads(json.dumps(out))  # as the manifest stores it (tuples become lists)


def is_complete(root: Path, rows: int) -> bool:
    """A cache with a manifest and at least `rows` rows in finished shards."""
    return (Path(root) / MANIFEST).exists() and CacheReader(root).rows_available() >= rows


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} is not a teacher cache (no {MANIFEST}): build one with fastdeit cache-teacher")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


class CacheWriter:
    """Appends rows in order; writes a shard each time `shard_rows` rows are in."""

    def __init__(self, root: Path, manifest: dict[str, Any], dtype: np.dtype) -> None:
        self.root, self.dtype = Path(root), dtype
        self.shard_rows = int(manifest["shard_rows"])
        self.root.mkdir(parents=True, exist_ok=True)
        existing = self.root / MANIFEST
        if existing.exists():
            old = read_manifest(self.root)
            diff = [k for k in IDENTITY_KEYS if old.get(k) != manifest.get(k)]
            if diff:
                raise UserError(f"{self.root} holds a cache of another {diff[0]} ({old.get(diff[0])!r} vs "
                                f"{manifest.get(diff[0])!r}): pick another --out")
        self.manifest = dict(manifest)
        atomic_write_bytes(json.dumps(self.manifest, indent=1).encode(), existing)
        self.done_shards = self._complete_prefix()
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def _complete_prefix(self) -> int:
        """Finished shards in a row from the first; a short last shard (written when an earlier
        build ended) is removed, to be written again whole."""
        n = 0
        while (self.root / f"shard-{n:05d}.sha256").exists():
            n += 1
        if n and len(np.load(self.root / f"shard-{n - 1:05d}.npy", mmap_mode="r")) < self.shard_rows:
            (self.root / f"shard-{n - 1:05d}.sha256").unlink()
            (self.root / f"shard-{n - 1:05d}.npy").unlink()
            n -= 1
        return n

    @property
    def rows_done(self) -> int:
        """Rows safely on disk: a resumed build starts here."""
        return self.done_shards * self.shard_rows

    def append(self, records: np.ndarray) -> None:
        self.buffer.append(records.astype(self.dtype, copy=False))
        self.buffered += len(records)
        while self.buffered >= self.shard_rows:
            rows = np.concatenate(self.buffer)
            self._write(rows[: self.shard_rows])
            rest = rows[self.shard_rows:]
            self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def _write(self, rows: np.ndarray) -> None:
        path = self.root / f"shard-{self.done_shards:05d}.npy"

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, rows, allow_pickle=False)

        atomic_write(path, write)
        atomic_write_bytes(_sha256_file(path).encode(), path.with_suffix(".sha256"))
        self.done_shards += 1

    def finish(self, **progress: Any) -> None:
        """Write the last partial shard and record what is covered (e.g. epochs) in the manifest."""
        if self.buffered:
            self._write(np.concatenate(self.buffer))
            self.buffer, self.buffered = [], 0
        self.manifest.update(progress)
        atomic_write_bytes(json.dumps(self.manifest, indent=1).encode(), self.root / MANIFEST)


class CacheReader:
    """Rows by number, from memory-mapped shards checked against their checksums."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.shard_rows = int(self.manifest["shard_rows"])
        self._shards: dict[int, np.ndarray] = {}

    def validate(self, expected: dict[str, Any]) -> None:
        """Fail with one line naming the first identity key that differs from the run's."""
        for key in IDENTITY_KEYS:
            if key in expected and self.manifest.get(key) != expected[key]:
                raise UserError(f"teacher cache {self.root} was built for another {key.replace('_', ' ')}: "
                                f"{_short(self.manifest.get(key))} in the cache, {_short(expected[key])} in this run")

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._shards:
            path = self.root / f"shard-{i:05d}.npy"
            check = path.with_suffix(".sha256")
            if not check.exists():
                raise UserError(f"teacher cache {self.root} has no shard {i} (rows {i * self.shard_rows}-"
                                f"{(i + 1) * self.shard_rows - 1}): the build did not get that far; "
                                f"resume it with fastdeit cache-teacher")
            if _sha256_file(path) != check.read_text().strip():
                raise UserError(f"teacher cache shard {path} is corrupted (checksum mismatch): delete it and its "
                                f".sha256, then resume the build with fastdeit cache-teacher")
            self._shards[i] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._shards[i]

    def rows_available(self) -> int:
        """Rows in finished shards, counted from the first (shard headers only)."""
        n = total = 0
        while (self.root / f"shard-{n:05d}.sha256").exists():
            total += len(np.load(self.root / f"shard-{n:05d}.npy", mmap_mode="r"))
            n += 1
        return total

    def rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        shard = rows // self.shard_rows
        out = None
        for s in np.unique(shard):
            sel = shard == s
            data = self._shard(int(s))
            local = rows[sel] - s * self.shard_rows
            if local.max() >= len(data):
                raise UserError(f"teacher cache {self.root} ends before row {int(rows[sel].max())}: "
                                f"the build did not get that far; resume it with fastdeit cache-teacher")
            part = np.asarray(data[local])
            if out is None:
                out = np.empty(len(rows), part.dtype)
            out[sel] = part
        return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
