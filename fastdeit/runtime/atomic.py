"""Files written whole or not at all: every file of a run, of a teacher cache, of a prepared
data set and of a download is written under a temporary name beside its own and renamed over
it in one step, so a crash or a full disk never leaves a torn file, and the previous file
stays. A failed write is one line (`write_failed`: a full disk names the folder, the space
left and what the file needs)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastdeit.errors import UserError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary file beside `path`, which then replaces `path` in one step.
    When the write fails (a full disk), the temporary file is removed, the previous `path`, if
    any, is kept, and one line says how much space the folder needs."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes writing the same file never share one
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        raise UserError(write_failed(path, e, written)) from None


# errno values that mean "no room": the disk, or this user's quota on it.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_failed(path: Path, error: BaseException, written: int = 0) -> str:
    """The one line for a write of `path` that failed: a full disk names the folder, the space
    left and what the file needs (its previous version's size, or what was written before the
    failure); the previous file, if any, is kept."""
    path = Path(path)
    kept = f"; the previous {path.name} is kept" if path.exists() else ""
    text = str(error)
    full = (getattr(error, "errno", None) in NO_SPACE or "No space left on device" in text  # safetensors' Rust error
            or (isinstance(error, RuntimeError) and "write" in text.lower()))  # torch.save's
    if not full:
        why = getattr(error, "strerror", None) or (text.splitlines() or [type(error).__name__])[0]
        return f"cannot write {path}: {why}{kept}"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    needed = max(written, path.stat().st_size if path.exists() else 0)
    need = f", at least {_size(needed)} needed" if needed else ""
    return (f"cannot write {path}: the disk holding {path.parent} is full ({_size(free)} free{need}){kept}: "
            f"free some space, then run the same command (--resume continues a run)")


def _size(n: float) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n /= 1024
        power += 1
    return f"{int(n):,} bytes" if power == 0 else f"{n:.1f} {units[power]}"


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(data: bytes, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
