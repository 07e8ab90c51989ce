"""constraints.txt: the versions the suite passed with, which `just setup` installs.

    python .ci/constraints.py write PYTHON FILE    what PYTHON's environment holds, as FILE (`just lock`)
    python .ci/constraints.py drift REPORT FILE    what pip's --dry-run REPORT would change in FILE (`just drift`)

Both print the differences, a package a line. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

# The DALI wheel for CUDA 12 is released with the same version as the one the lock resolves
# (for CUDA 13); the two cannot be installed together, so the lock pins it by that version.
DALI = "nvidia-dali-cuda130"
DALI_TWIN = "nvidia-dali-cuda120"
HEADER = """\
# The versions fastdeit's suite passed with, installed by `just setup` (pip install -c).
# Users' `pip install -e .` keeps pyproject.toml's ranges. Written by `just lock`, which re-resolves
# today's releases in a fresh environment and writes this file only after ruff and the suite pass.
# `just drift` (and CI, after the suite) prints what today's newest releases would change.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version), from `name==version` lines."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = (part.strip() for part in line.split("==", 1))
            pins[canonical(name)] = (name, version)
    return pins


def changes(old: dict[str, tuple[str, str]], new: dict[str, tuple[str, str]]) -> list[str]:
    """One line per package whose pin differs, is new, or is gone, by name."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before = old.get(key, ("", ""))[1]
        after = new.get(key, ("", ""))[1]
        if before != after:
            name = (new.get(key) or old[key])[0]
            lines.append(f"{name}: {before or '(none)'} -> {after or '(none)'}")
    return lines


def frozen(python: str) -> dict[str, tuple[str, str]]:
    """What the environment of `python` holds, less fastdeit itself (an editable install)."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    pins = {k: v for k, v in read_pins(out).items() if k != "fastdeit"}
    if DALI in pins:
        pins[DALI_TWIN] = (DALI_TWIN, pins[DALI][1])
    return pins


def render(pins: dict[str, tuple[str, str]]) -> str:
    made = (f"# Resolved on {datetime.date.today().isoformat()} with Python {platform.python_version()} "
            f"on {platform.system()} {platform.machine()}.\n")
    return HEADER + made + "".join(f"{name}=={version}\n" for name, version in
                                   (pins[k] for k in sorted(pins)))


def reported(report: dict) -> dict[str, tuple[str, str]]:
    """What a `pip install --dry-run --report` would install, less fastdeit itself."""
    pins = {}
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        name, version = meta.get("name", ""), meta.get("version", "")
        if name and canonical(name) != "fastdeit":
            pins[canonical(name)] = (name, version)
    return pins


def drift_lines(old: dict[str, tuple[str, str]], newest: dict[str, tuple[str, str]]) -> list[str]:
    """The packages a fresh install would get at another version than locked (packages the lock
    holds that the resolution does not reach, such as pip or the other DALI wheel, are left out)."""
    return changes({k: v for k, v in old.items() if k in newest}, newest)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("write", "drift"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    verb, source, path = argv
    target = Path(path)
    old = read_pins(target.read_text()) if target.exists() else {}
    if verb == "write":
        new = frozen(source)
        target.write_text(render(new))
        lines = changes(old, new)
        print("\n".join(lines) if lines else f"{target}: no version changed")
        return 0
    lines = drift_lines(old, reported(json.loads(Path(source).read_text())))
    for line in lines:
        print(f"drift: {line}")
    print(f"drift: {len(lines)} package(s) of today's newest resolution differ from {target}" if lines
          else f"drift: none, {target} is today's newest resolution")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
