"""ImageFolder data sets (`train/<class>/*`, `val/<class>/*`): scanning, checks, image sizes.

The index holds what the plan needs (every source image's width and height, read from the
file header only) and what a cache fingerprint needs (sorted relative paths and byte sizes).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from fastdeit.data import prepared, stored_index
from fastdeit.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageIndex:
    """One split of an ImageFolder tree (paths relative to `root`), or of a prepared data set
    (`store` holds the bytes). Pipelines read a row's bytes with `read` or `open`."""

    root: Path
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray  # int64 [n]
    sizes: np.ndarray  # int32 [n, 2]: (width, height); (0, 0) where the header is unreadable
    nbytes: np.ndarray  # int64 [n]
    skip: frozenset[int] = frozenset()  # rows the pipelines do not decode: their slots copy another sample
    store: prepared.PackedStore | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        """Row i's encoded bytes (uint8); OSError where they cannot be read."""
        if self.store is not None:
            return self.store.read(i)
        return np.fromfile(self.root / self.paths[i], dtype=np.uint8)

    def open(self, i: int) -> str | io.BytesIO:
        """What PIL opens for row i: the file's path, or its bytes."""
        if self.store is not None:
            return io.BytesIO(self.store.read(i))
        return str(self.root / self.paths[i])

    @property
    def unreadable(self) -> list[str]:
        return [p for p, s in zip(self.paths, self.sizes) if s[0] == 0]

    def with_skip(self, paths: list[str]) -> ImageIndex:
        """The index with these relative paths (others are ignored) added to the skip set."""
        rows = {p: i for i, p in enumerate(self.paths)}
        extra = {rows[p] for p in paths if p in rows}
        return replace(self, skip=self.skip | extra)

    def fingerprint(self) -> str:
        """sha256 of the sorted relative file list, byte sizes and class list."""
        h = hashlib.sha256()
        h.update(os.fsencode("\n".join(self.classes)))  # a name's own bytes, UTF-8 or not
        for p, n in zip(self.paths, self.nbytes):
            h.update(os.fsencode(f"\n{p}\t{int(n)}"))
        return h.hexdigest()


def _header_size(path: Path | str) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    # An unreadable header, a symlink loop, or a header claiming billions of pixels (a
    # decompression bomb): the file is skipped, the pipelines substitute its rows.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return (0, 0)


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as e:
        raise UserError(f"cannot read the folder {folder}: {e.strerror or e}") from None


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError as e:
        raise UserError(f"cannot read the folder {folder}: {e.strerror or e}") from None


def _is_dir(entry: os.DirEntry) -> bool:
    """entry.is_dir(); False where it cannot be followed (a symlink loop)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _stat(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns); (0, 0) where the file cannot be followed."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return 0, 0


def _in_threads(fn: Callable, items: list, progress: Callable[[int, int], None] | None = None,
                chunk: int = 1024) -> list:
    """[fn(x) for x in items] in 8 threads, a chunk of items per task (a task per item would
    cost more than a stat): system calls release the GIL, so cold reads overlap."""
    chunks = [items[k:k + chunk] for k in range(0, len(items), chunk)]
    out: list = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for part in pool.map(lambda c: [fn(x) for x in c], chunks):
            out += part
            if progress is not None:
                progress(len(out), len(items))
    return out


def _listing(base: Path, split: str) -> tuple[list[str], list[str], list[int]]:
    """(classes, relative paths, labels) of a split folder, sorted; checked as it goes."""
    classes = sorted(d.name for d in _entries(base) if _is_dir(d) and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{base} has no class folders: expected {split}/<class>/<images>")
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        # Names only (no file type): a directory listing costs a fraction of a scandir's
        # entries; a name that is no readable file fails its stat or header and is skipped.
        files = sorted(n for n in _names(base / cls) if n.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise UserError(f"class folder {base / cls} has no images ({', '.join(IMG_EXTENSIONS)})")
        paths.extend(f"{cls}/{f}" for f in files)
        labels.extend([label] * len(files))
    return classes, paths, labels


def scan_split(root: Path, split: str, progress: Callable[[int, int], None] | None = None,
               cache_dir: Path | str | None = None) -> ImageIndex:
    """Index `root/split`, checking that it exists, has classes and each class has images.
    With `cache_dir`, the index is stored there and reused while the files are unchanged
    (see stored_index.py): only new, resized or replaced files have their header read."""
    base = Path(root) / split
    if base.exists() and not base.is_dir():
        raise UserError(f"{base} is a file, not a folder: expected {split}/<class>/<images>")
    if not base.is_dir():
        raise UserError(f"data folder {base} does not exist: expected {split}/<class>/<images> "
                        f"(make one with: fastdeit make-data DIR)")
    classes, paths, labels = _listing(base, split)
    full = [f"{base}{os.sep}{p}" for p in paths]
    # One thread: a stat of a cached inode costs ~2 µs, less than threads contending for the GIL.
    stats = np.array([_stat(p) for p in full], np.int64).reshape(-1, 2)
    nbytes, mtimes = stats[:, 0].copy(), stats[:, 1].copy()
    where = stored_index.stored_path(Path(cache_dir), base) if cache_dir else None
    stored = stored_index.load(where) if where else None
    sizes, todo = stored_index.reuse(stored, paths, nbytes, mtimes)
    if len(todo):
        sizes[todo] = np.array(_in_threads(_header_size, [full[i] for i in todo], progress, chunk=64), np.int32)
    if where and (len(todo) or stored is None or len(stored["paths"]) != len(paths)):
        stored_index.save(where, paths, sizes, nbytes, mtimes)
    return ImageIndex(root=base, classes=tuple(classes), paths=tuple(paths), labels=np.array(labels, np.int64),
                      sizes=sizes, nbytes=nbytes, skip=frozenset(np.flatnonzero(sizes[:, 0] == 0).tolist()))


def _decodes(path: Path | str | io.BytesIO) -> bool:
    """Decode the whole file, at 1/8 scale where the format allows it (JPEG DCT scaling):
    every byte is still read and checked, at a fraction of the cost."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _row_decodes(index: ImageIndex, i: int) -> bool:
    try:
        return _decodes(index.open(i))
    except OSError:  # a prepared shard shorter than its index
        return False


def find_unreadable(index: ImageIndex, rows: list[int] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[int]:
    """Rows of `index` (all by default) whose file does not decode."""
    rows = list(range(len(index))) if rows is None else rows
    bad = []
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        for k, ok in enumerate(pool.map(lambda i: _row_decodes(index, i), rows)):
            if not ok:
                bad.append(rows[k])
            if progress is not None and (k % 256 == 0 or k == len(rows) - 1):
                progress(k + 1, len(rows))
    return bad


def load_dataset(
    root: Path | str, progress: Callable[[int, int], None] | None = None, cache_dir: Path | str | None = None
) -> tuple[ImageIndex, ImageIndex]:
    """The train and val splits of `root` (an ImageFolder tree or a prepared data set), with
    their class sets checked against each other; with `cache_dir`, a tree's indexes are stored
    and reused (stored_index.py)."""
    root = Path(root)
    if str(root) and root.exists() and not root.is_dir():  # "does not exist" would send the user looking for it
        raise UserError(f"{root} is a file, not a data folder: pass the folder holding train/ and val/ "
                        f"(or a prepared data set's folder)")
    if not str(root) or not root.is_dir():
        raise UserError(f"data folder {str(root) or '(none given)'} does not exist: pass --data DIR "
                        f"(make one with: fastdeit make-data DIR)")
    if prepared.is_prepared(root):
        manifest = prepared.read_manifest(root)
        return load_prepared_split(root, "train", manifest), load_prepared_split(root, "val", manifest)
    train = scan_split(root, "train", progress, cache_dir)
    val = scan_split(root, "val", cache_dir=cache_dir)
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise UserError(f"train and val class folders differ (only in train: {only_t or '-'}; "
                        f"only in val: {only_v or '-'})")
    return train, val


def load_prepared_split(root: Path, split: str, manifest: dict) -> ImageIndex:
    """One split of a prepared data set as an index: nothing to scan, every size is stored."""
    classes, paths, rows, store = prepared.load_split(root, split, manifest)
    sizes = np.stack([rows["width"], rows["height"]], 1).astype(np.int32)
    return ImageIndex(root=root / split, classes=classes, paths=paths, labels=rows["label"].astype(np.int64),
                      sizes=sizes, nbytes=rows["length"].astype(np.int64), store=store)
