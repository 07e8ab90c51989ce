"""What produced a file: the code's commit, and for measurements the device, versions and date."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from fastdeit import __version__


def git_commit() -> str | None:
    """The commit of the fastdeit source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
        # Results files being written do not make the code that wrote them dirty.
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--",
                                ":/", ":(exclude,top)benchmarks/results"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def measured_on(device: torch.device) -> dict[str, Any]:
    """Where and with what a measurement was taken (device name, versions, UTC date), for the
    results files of the benchmarks."""
    import numpy as np
    import timm

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores")
    versions = {"fastdeit": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "timm": timm.__version__, "numpy": np.__version__}
    if device.type == "cuda":
        import triton

        versions.update(triton=triton.__version__, cuda=torch.version.cuda)
    try:
        import nvidia.dali

        versions["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions, "git_commit": git_commit()}


def write_results(report: dict[str, Any], path: Path | None) -> None:
    """A benchmark's JSON, where asked for (folders made)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
