"""Prepared data sets (made by `fastdeit prepare-data`): the format, and reading it.

A prepared data set is a folder:

    job.json                   the request (options, the source's fingerprints), written first
    manifest.json              written last: the format, how images were stored, per split its
                               classes, rows, shards and the source files left out
    train/shard-00000.tar      POSIX tar files of the images (member name: the source's relative
    train/shard-00000.json     path); beside each, its row table, written once the tar is whole
    train/index.npy            every row of the split: shard, offset and length of the image's
    train/paths.txt            bytes in its tar, label, width, height, crc32; and its path
    val/...

Rows are read by random access from memory-mapped shards, so a prepared split is an
`ImageIndex` like a folder's: the plan, exact resume, the teacher-cache fingerprint (paths
and byte sizes: a set prepared with `--max-side 0` has its source's fingerprint) and
distributed sharding work unchanged.
"""

from __future__ import annotations

import json
import mmap
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fastdeit.errors import UserError

FORMAT = "fastdeit-prepared"
VERSION = 1
MANIFEST = "manifest.json"
JOB = "job.json"  # the request, written first by prepare-data
ROW_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("length", "<i8"), ("label", "<i4"),
                      ("width", "<i4"), ("height", "<i4"), ("crc32", "<u4")])


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.tar"


def is_prepared(root: Path) -> bool:
    """A folder that holds a prepared data set, finished or not."""
    return (root / MANIFEST).is_file() or (root / JOB).is_file()


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} is an unfinished prepared data set (no {MANIFEST}): run fastdeit prepare-data "
                        f"again with the same arguments to finish it")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{root} holds {manifest.get('format')} version {manifest.get('version')}; this fastdeit "
                        f"reads {FORMAT} version {VERSION}: prepare it again")
    return manifest


class PackedStore:
    """The encoded bytes of a split's rows, read from memory-mapped tar shards.

    Pickles without its maps (DALI's reader processes open their own)."""

    def __init__(self, folder: Path, rows: np.ndarray) -> None:
        self.folder, self.rows = folder, rows
        self._maps: dict[int, mmap.mmap] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "rows": self.rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder = state["folder"]
        self.rows = state["rows"]
        self._maps = {}

    def _map(self, shard: int) -> mmap.mmap:
        if shard not in self._maps:
            path = self.folder / shard_name(shard)
            try:
                with open(path, "rb") as f:
                    self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {path}: {e}: the prepared data set is incomplete, prepare it again") \
                    from None
        return self._maps[shard]

    def read(self, i: int) -> np.ndarray:
        """Row i's bytes: a view of the mapping, not a copy."""
        row = self.rows[i]
        mm = self._map(int(row["shard"]))
        if int(row["offset"]) + int(row["length"]) > len(mm):
            raise OSError(f"{self.folder / shard_name(int(row['shard']))} is shorter than its index says")
        return np.frombuffer(mm, np.uint8, count=int(row["length"]), offset=int(row["offset"]))

    def corrupted(self, rows: list[int], progress: Callable[[int, int], None] | None = None) -> list[int]:
        """Rows whose bytes do not match their crc32 (or that cannot be read)."""
        bad = []
        for k, i in enumerate(rows):
            try:
                ok = zlib.crc32(self.read(i)) == int(self.rows[i]["crc32"])
            except OSError:
                ok = False
            if not ok:
                bad.append(i)
            if progress is not None and (k % 1024 == 0 or k == len(rows) - 1):
                progress(k + 1, len(rows))
        return bad


def load_split(root: Path, split: str, manifest: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...],
                                                                         np.ndarray, PackedStore]:
    """(classes, paths, rows, store) of one split of a prepared data set."""
    folder = root / split
    info = manifest["splits"].get(split)
    if info is None:
        raise UserError(f"the prepared data set {root} has no {split} split")
    try:
        rows = np.load(folder / "index.npy", allow_pickle=False)
        text = (folder / "paths.txt").read_text(encoding="utf-8", errors="surrogateescape")  # names as listed
        paths = tuple(text.split("\n")) if len(rows) else ()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the index of {folder}: {e}: prepare the data set again") from None
    if rows.dtype != ROW_DTYPE or len(paths) != len(rows) or len(rows) != info["rows"]:
        raise UserError(f"the index of {folder} does not match its manifest: prepare the data set again")
    check_shard_sizes(folder, rows)
    return tuple(info["classes"]), paths, rows, PackedStore(folder, rows)


def check_shard_sizes(folder: Path, rows: np.ndarray) -> None:
    """Every shard holds the bytes its rows' offsets and lengths reach (one stat a shard: a cut
    or missing shard is refused at open, not found image by image; a changed byte is the crc's,
    `fastdeit check-data`)."""
    if not len(rows):
        return
    ends = np.zeros(int(rows["shard"].max()) + 1, np.int64)
    np.maximum.at(ends, rows["shard"], rows["offset"] + rows["length"])
    for shard in np.flatnonzero(ends):
        path = folder / shard_name(int(shard))
        try:
            size = path.stat().st_size
        except OSError as e:
            size, why = -1, e.strerror
        else:
            why = f"{size:,} bytes, its index reaches {int(ends[shard]):,}"
        if size < ends[shard]:
            raise UserError(f"the prepared data set's {path} is cut short or missing ({why}): run fastdeit "
                            f"prepare-data again with the same arguments (it rebuilds each shard whose size is not "
                            f"its table's)")
