"""The fastdeit cache folder: generated demo data, stored file indexes, downloaded weights and
measured choices, reused across runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where `fastdeit demo` keeps its generated data and measured choices: $FASTDEIT_CACHE,
    else the XDG cache folder."""
    if os.environ.get("FASTDEIT_CACHE"):
        return Path(os.environ["FASTDEIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastdeit"
