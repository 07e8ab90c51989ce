"""A split's index, stored after its first scan and reused while the tree is unchanged.

The scan reads every image's header for its width and height: 20-35 s per 100,000 files on
the development machine, minutes at ImageNet size, for every process of every start. The
result is stored in the fastdeit cache folder (`run.cache_dir`: $FASTDEIT_CACHE), one file per
split under `index/`, named by the split's absolute path.

What a start checks, and pays, with a stored index: it lists the class folders and every
class folder's files (one directory listing each: names only) and stats every file (size and
modification time, in threads). A file whose relative path, size and mtime equal a stored
row reuses that row's width and height; a new, resized or replaced file has its header read;
a removed one is dropped. The stored file is rewritten only when something changed. (A file
rewritten in place with the same size within the file system's mtime resolution would go
unseen; `fastdeit check-data` decodes every file.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from fastdeit.errors import UserError

VERSION = 2  # 2: names as file-system bytes, NUL-separated (1 held UTF-8 text split on newlines)


def stored_path(cache_dir: Path, base: Path) -> Path:
    """Where the index of the split folder `base` is kept."""
    key = hashlib.sha256(os.fsencode(Path(base).resolve())).hexdigest()[:24]
    return Path(cache_dir) / "index" / f"{key}.npz"


def load(path: Path) -> dict[str, np.ndarray] | None:
    """The stored arrays (paths as a list), or None when absent, unreadable or of another version."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if int(f["version"]) != VERSION:
                return None
            out = {k: f[k] for k in ("sizes", "nbytes", "mtimes")}
            out["paths"] = os.fsdecode(f["paths"].tobytes()).split("\0") if f["paths"].size else []
            return out if len(out["paths"]) == len(out["sizes"]) else None  # damaged: scanned again
    except (OSError, ValueError, KeyError, EOFError):
        return None


def save(path: Path, paths: list[str], sizes: np.ndarray, nbytes: np.ndarray, mtimes: np.ndarray) -> None:
    """Write the index under a temporary name, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    # A Linux file name may hold any byte but NUL and "/": names kept as their bytes (os.fsencode
    # of names that are not UTF-8 gives back their bytes) joined by NUL, which no name holds.
    names = b"\0".join(os.fsencode(p) for p in paths)
    try:
        np.savez(tmp, version=np.array(VERSION), paths=np.frombuffer(names, np.uint8),
                 sizes=sizes, nbytes=nbytes, mtimes=mtimes)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot store the index of the data set in {path.parent} ({e.strerror}): free some "
                        f"space there, or set run.cache_dir to another folder") from None


def reuse(stored: dict[str, np.ndarray] | None, paths: list[str], nbytes: np.ndarray,
          mtimes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, rows still to read): stored widths and heights where path, size and mtime match."""
    sizes = np.zeros((len(paths), 2), np.int32)
    if not stored:
        return sizes, np.arange(len(paths))
    if stored["paths"] == paths:  # the usual case, the same files: compared as arrays
        same = (stored["nbytes"] == nbytes) & (stored["mtimes"] == mtimes)
        sizes[same] = stored["sizes"][same]
        return sizes, np.flatnonzero(~same)
    row = {p: i for i, p in enumerate(stored["paths"])}
    at = np.array([row.get(p, -1) for p in paths], np.int64)
    found = at >= 0
    same = found.copy()
    same[found] = (stored["nbytes"][at[found]] == nbytes[found]) & (stored["mtimes"][at[found]] == mtimes[found])
    sizes[same] = stored["sizes"][at[same]]
    return sizes, np.flatnonzero(~same)
