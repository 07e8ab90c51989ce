"""Writing run files safely, naming the code that wrote them, stopping at a safe point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fastdeit.errors import UserError


def git_commit() -> str | None:
    """The commit of the fastdeit source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def measured_on(device: torch.device) -> dict[str, Any]:
    """Where and with what a measurement was taken (device name, versions, UTC date), for the
    results files of the benchmarks."""
    import datetime
    import platform

    import numpy as np
    import timm

    from fastdeit.pipelines import dali

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                "numpy": np.__version__}
    if device.type == "cuda":
        import triton

        versions.update(triton=triton.__version__, cuda=torch.version.cuda)
    if dali.available():
        import nvidia.dali

        versions["dali"] = nvidia.dali.__version__
    return {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions}


def write_report(report: dict[str, Any], path: Path | None) -> None:
    """A benchmark's JSON, where asked for (folders made)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def refuse_existing_run(out: Path) -> None:
    """A run folder that already holds a run is never started over (continue it instead)."""
    existing = [n for n in ("checkpoint-last.pt", "metrics.jsonl") if (Path(out) / n).exists()]
    if existing:
        raise UserError(f"{out} already holds a run ({existing[0]}): continue it with --resume, or pick another --out")


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def sigint_once(first: Callable[[], None]) -> Iterator[None]:
    """Within the block, the first Ctrl-C or SIGTERM (what a scheduler sends before it
    preempts, and what torchrun forwards to its workers) calls `first`, which asks the loop to
    stop at its next safe point; a second raises KeyboardInterrupt. Only the main thread can
    handle signals: elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = {"n": 0}

    def handler(signum: int, frame: Any) -> None:
        seen["n"] += 1
        if seen["n"] > 1:
            raise KeyboardInterrupt
        first()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
