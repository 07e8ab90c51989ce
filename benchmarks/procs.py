"""What /proc says of a process and its children (Linux): for benchmarks/soak.py, which must find
the processes a job started (torchrun starts each rank in a session of its own) and tell
whether any outlived it."""

from __future__ import annotations

import contextlib
from pathlib import Path


def read(path: str) -> str:
    with contextlib.suppress(OSError):  # the process is gone
        return Path(path).read_bytes().decode(errors="replace")
    return ""


def stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name ([state, ppid, pgrp, ...]); [] when gone."""
    text = read(f"/proc/{pid}/stat")
    return text[text.rfind(")") + 2:].split() if text else []


def cmdline(pid: int) -> str:
    return read(f"/proc/{pid}/cmdline").replace("\0", " ")


def children(pid: int) -> set[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").glob("*/children"))
    except OSError:  # it ended while we looked
        return set()
    if tasks or not Path(f"/proc/{pid}").exists():
        return {int(x) for task in tasks for x in read(str(task)).split()}
    # Kernels without CONFIG_PROC_CHILDREN: every process's parent, from its stat.
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and stat(int(p.name))[1:2] == [str(pid)]}


def descendants(pid: int) -> dict[int, str]:
    kids = {kid: cmdline(kid) for kid in children(pid)}
    return {**kids, **{p: c for kid in kids for p, c in descendants(kid).items()}}


def alive(pid: int, cmd: str) -> bool:
    """Still running (not a zombie), and still the same command (pids are reused)."""
    return stat(pid)[:1] not in ([], ["Z"]) and cmdline(pid) == cmd


def ranks(launcher: int) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (torchrun starts them, each in its own session)."""
    envs = {pid: read(f"/proc/{pid}/environ").split("\0") for pid in children(launcher)
            if "fastdeit.runtime.launch" in cmdline(pid)}
    return {int(next((v[5:] for v in env if v.startswith("RANK=")), -1)): pid for pid, env in envs.items()}
