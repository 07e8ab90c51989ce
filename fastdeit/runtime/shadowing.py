"""The repository's root folders `kernels/` and `pipelines/` install as `fastdeit.kernels` and
`fastdeit.pipelines`, but Python started in the repository root (the test suite, `python -m`, a
notebook) finds them first under their bare names, which belong to other distributions on PyPI
(transformers imports PyPI's `kernels`). A root folder imported under its bare name calls
`give_way`, so that the bare name means there what it means anywhere else: the installed
distribution, or no module at all."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def _is_root(entry: str, root: Path) -> bool:
    """A sys.path entry that is the repository root ('' is the working directory)."""
    try:
        return Path(entry or os.getcwd()).resolve() == root
    except (OSError, RuntimeError, ValueError):  # an unreadable or odd entry is not the root
        return False


def give_way(name: str, folder: str) -> None:
    """Replace the module being imported as `name` (a root folder's __init__, now running) by the
    installed distribution of that name, found on sys.path without the repository root; the
    import statement returns what sys.modules holds once the __init__ has run. With none
    installed, the import fails as if the folder were not there."""
    own = Path(folder).resolve()
    path = [entry for entry in sys.path if not _is_root(entry, own.parent)]
    spec = None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        found = find(name, path) if find is not None else None
        if found is not None and found.origin != str(own / "__init__.py"):
            spec = found
            break
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
