"""The on-disk teacher cache: manifest, shard writer, shard reader, validation.

A cache is a folder:

    manifest.json         what the cache is for (mode, teacher, data, plan, ...), written first
    shard-00000.npy       fixed-size blocks of rows (a structured numpy array, memory-mapped
    shard-00000.sha256    when read); its checksum, written after the shard is in place

Shards are written to a temporary name and renamed, then their checksum; a shard without a
checksum file is unfinished and never read, so a killed build resumes at the missing shards.
Shards are written by number (ranks build disjoint shards of one cache), each a pure
function of its rows, so a cache built by N ranks is byte-identical to one process's. A
shard's checksum is keyed by the cache's identity and the shard's number, so a shard copied
from another cache does not pass. Opening a cache compares its manifest with
what the run expects and names what differs: the cache never hands out a target for another
teacher, data set, plan or epoch. A shard is checked against its checksum the first time it
is read, and every shard again (by the rank that owns it) when a build is resumed or extended.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fastdeit.config.schema import CacheMode, TrainConfig
from fastdeit.data.folder import ImageIndex
from fastdeit.errors import UserError, differences
from fastdeit.models.factory import teacher_sha256
from fastdeit.models.fetch import sha256_of
from fastdeit.runtime.atomic import atomic_write, atomic_write_bytes
from fastdeit.training.rundir import RunDir

FORMAT = 2  # 2: shard checksums keyed by the cache identity
MANIFEST = "manifest.json"
# Keys that say what the rows mean: a run and a cache must agree on all of them.
IDENTITY_KEYS = ("format", "mode", "teacher", "teacher_sha256", "dataset", "num_classes", "plan", "topk",
                 "amp", "shard_rows", "record_dtype", "labelmap_size", "teacher_img_size")
# Keys added after format 2 was fixed: part of a cache's identity only where they are set, so
# the checksums of existing caches stay valid (a new kind's own keys are added here too).
OPTIONAL_KEYS = ("teacher_img_size",)


def class_index_dtype(num_classes: int) -> str:
    """The narrowest type that holds a class index: what cached top-k indices are stored as."""
    return "<i2" if num_classes <= np.iinfo(np.int16).max else "<i4"


def dtype_text(dtype: np.dtype) -> str:
    return str(dtype.descr)


@dataclass(frozen=True)
class TeacherId:
    """Whose outputs a cache holds: the teacher's name and its weights' hash."""

    name: str
    sha256: str

    @staticmethod
    def of(teacher: nn.Module, cfg: TrainConfig) -> TeacherId:
        """A loaded teacher's (its weights hashed), under the name the run gives it."""
        return TeacherId(cfg.distill.teacher or getattr(teacher, "fastdeit_name", type(teacher).__name__),
                         teacher_sha256(teacher))

    @staticmethod
    def recorded(cfg: TrainConfig, manifest: dict[str, Any]) -> TeacherId:
        """The one a cache's manifest records, taken without the weights to check it (a run that
        only reads the cache and was given no --teacher-ckpt); the run's --teacher must still
        name it."""
        return TeacherId(cfg.distill.teacher or str(manifest.get("teacher")), str(manifest.get("teacher_sha256")))


def identity(cfg: TrainConfig, mode: CacheMode, index: ImageIndex, teacher: TeacherId,
             own: dict[str, Any]) -> dict[str, Any]:
    """What a cache's rows mean; a run and its cache must agree on every key. `own`: what the
    rows of this kind depend on besides the teacher and the data (teachers.TARGETS declares it)."""
    out = {"format": FORMAT, "mode": mode, "teacher": teacher.name, "teacher_sha256": teacher.sha256,
           "dataset": index.fingerprint(), "num_classes": len(index.classes), **own}
    return json.loads(json.dumps(out))  # as the manifest stores it (tuples become lists)


def check_cache_out(out: Path, data: Path) -> None:
    """A cache gets a folder of its own: not a run folder (its shards would mix with the run's
    files) and not inside the data set (they would be read as images or classes)."""
    out, data = Path(out).resolve(), Path(data).resolve()
    if out == data or data in out.parents:
        raise UserError(f"--out {out} is inside the data set {data}: pick a folder outside it")
    if out.is_dir() and any((out / name).exists() for name in RunDir.NAMES if name != ".lock"):
        raise UserError(f"--out {out} is a training run's folder: give the cache a folder of its own")


def is_complete(root: Path, rows: int) -> bool:
    """A cache with a manifest and at least `rows` rows in finished shards."""
    return (Path(root) / MANIFEST).exists() and CacheReader(root).rows_available() >= rows


def _shard_sum(path: Path, key: str, number: int) -> str:
    """The shard's checksum, keyed by its cache's identity and its number: a shard (and its
    checksum file) copied from another cache, or moved to another number, does not match."""
    return sha256_of(path, salt=f"{key}|{number}|")


def identity_key(manifest: dict[str, Any]) -> str:
    keys = {k: manifest.get(k) for k in IDENTITY_KEYS if k not in OPTIONAL_KEYS or k in manifest}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def _shard_length(path: Path) -> int:
    """Rows in a shard, read from its .npy header; a truncated or unreadable shard is one line."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            need = f.tell() + int(np.prod(shape)) * dtype.itemsize
        if path.stat().st_size < need:
            raise ValueError("truncated")
        return int(shape[0])
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"teacher cache shard {path} is truncated or unreadable ({e}): delete it and its .sha256, "
                        f"then resume the build with fastdeit cache-teacher") from None


def _shard_path(root: Path, number: int) -> Path:
    return root / f"shard-{number:05d}.npy"


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} is not a teacher cache (no {MANIFEST}): build one with fastdeit cache-teacher")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def describe(key: str, cache: Any, run: Any) -> str:
    """What differs in one identity key, leaf by leaf: 'plan: seed 5 in the cache, 6 in this run'."""
    parts = [f"{k + ' ' if k else ''}{_short(a)} in the cache, {_short(b)} in this run"
             for k, a, b in differences(cache, run)]
    return f"{key}: " + "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more" if len(parts) > 4 else "")


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 24 or " " in text else text[:16] + "..."  # hashes: their first 16 digits


class CacheWriter:
    """Writes shards by number, so that ranks can build disjoint shards of one cache at once.
    Opening an existing cache checks that it has the same identity; `shard_done` checks a
    finished shard against its checksum (a shard that does not match is built again)."""

    def __init__(self, root: Path, manifest: dict[str, Any], dtype: np.dtype, create: bool = True) -> None:
        self.root, self.dtype = Path(root), dtype
        self.shard_rows = int(manifest["shard_rows"])
        if (self.root / MANIFEST).exists():
            old = read_manifest(self.root)
            diff = [k for k in IDENTITY_KEYS if old.get(k) != manifest.get(k)]
            if diff:
                what = describe(diff[0], old.get(diff[0]), manifest.get(diff[0]))
                raise UserError(f"{self.root} holds a cache of another {what}: pick another --out")
            self.manifest = old  # what it was first built with stays on record
        elif create:  # one process creates a cache; the other ranks open it after a barrier
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = dict(manifest)
            atomic_write_bytes(json.dumps(self.manifest, indent=1).encode(), self.root / MANIFEST)
        else:
            raise RuntimeError(f"{self.root} has no manifest yet")
        self.key = identity_key(self.manifest)
        self.built_with = manifest.get("built_with")
        self.rebuilt: list[str] = []

    def shard_done(self, number: int, rows: int) -> bool:
        """Shard `number` is finished, holds at least `rows` rows and matches its checksum. A
        shorter one (the last shard of a smaller build) or a mismatching one is to be rebuilt."""
        path = _shard_path(self.root, number)
        check = path.with_suffix(".sha256")
        if not check.exists():
            return False
        if not path.exists() or _shard_sum(path, self.key, number) != check.read_text().strip():
            self.rebuilt.append(path.name)
            return False
        return _shard_length(path) >= rows

    def write_shard(self, number: int, rows: np.ndarray) -> None:
        """The shard in place (atomically), then its checksum: never a checksum without its bytes."""
        path = _shard_path(self.root, number)
        path.with_suffix(".sha256").unlink(missing_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, rows.astype(self.dtype, copy=False), allow_pickle=False)

        atomic_write(path, write)
        atomic_write_bytes(_shard_sum(path, self.key, number).encode(), path.with_suffix(".sha256"))

    def finish(self, added: bool) -> None:
        """A build that added rows with another device or precision says so in the manifest
        (`extended_with`)."""
        if added and self.built_with not in (None, self.manifest.get("built_with")):
            self.manifest.setdefault("extended_with", []).append(self.built_with)
            atomic_write_bytes(json.dumps(self.manifest, indent=1).encode(), self.root / MANIFEST)


class CacheReader:
    """Rows by number, from memory-mapped shards checked against their checksums."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.shard_rows = int(self.manifest["shard_rows"])
        self.key = identity_key(self.manifest)
        self._shards: dict[int, np.ndarray] = {}

    def validate(self, expected: dict[str, Any]) -> None:
        """Fail with one line naming the first identity key that differs from the run's, and how."""
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"teacher cache {self.root} has format {self.manifest.get('format')}, this fastdeit "
                            f"reads format {FORMAT}: build it again with fastdeit cache-teacher")
        for key in IDENTITY_KEYS:
            if (key in expected or key in OPTIONAL_KEYS) and self.manifest.get(key) != expected.get(key):
                raise UserError(f"teacher cache {self.root} was built for another "
                                f"{describe(key.replace('_', ' '), self.manifest.get(key), expected.get(key))}")

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._shards:
            path = _shard_path(self.root, i)
            check = path.with_suffix(".sha256")
            if not check.exists():
                raise UserError(f"teacher cache {self.root} has no shard {i} (rows {i * self.shard_rows}-"
                                f"{(i + 1) * self.shard_rows - 1}): the build did not get that far; "
                                f"resume it with fastdeit cache-teacher")
            if not path.exists() or _shard_sum(path, self.key, i) != check.read_text().strip():
                raise UserError(f"teacher cache shard {path} is corrupted or belongs to another cache (checksum "
                                f"mismatch): run fastdeit cache-teacher again on this cache to rebuild it")
            _shard_length(path)  # a clear line for a truncated file
            # A plain ndarray over the mapping: np.memmap's own indexing costs microseconds a call.
            self._shards[i] = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
        return self._shards[i]

    def rows_available(self) -> int:
        """Rows in finished shards, counted from the first (shard headers only)."""
        n = total = 0
        while _shard_path(self.root, n).with_suffix(".sha256").exists():
            total += _shard_length(_shard_path(self.root, n))
            n += 1
        return total

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The records of `rows`, in their order. The rows are sorted once and each shard they
        touch gives its run of them with one `take` into the output: a few microseconds per
        shard touched (a label map's batch touches most shards of its cache, hence their size:
        `labelmap_shard_rows`), nothing over the whole batch per shard."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return self._shard(0)[:0].copy()
        order = np.argsort(rows, kind="stable")
        ranked = rows[order]
        shard = ranked // self.shard_rows
        local = ranked - shard * self.shard_rows
        cuts = (np.flatnonzero(shard[1:] != shard[:-1]) + 1).tolist()
        starts = [0, *cuts]
        gathered = None
        for s, a, b in zip(shard[starts].tolist(), starts, [*cuts, len(ranked)]):
            data = self._shard(s)
            if local[b - 1] >= len(data):
                raise UserError(f"teacher cache {self.root} ends before row {int(ranked[b - 1])}: "
                                f"the build did not get that far; resume it with fastdeit cache-teacher")
            if gathered is None:
                gathered = np.empty(len(rows), data.dtype)
            np.take(data, local[a:b], axis=0, out=gathered[a:b])
        out = np.empty_like(gathered)
        out[order] = gathered
        return out
