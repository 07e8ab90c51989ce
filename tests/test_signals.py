"""Stops as schedulers send them, through real process groups (`setsid`): SIGTERM / SIGINT to
the whole group (SLURM signals every process of a job step; Ctrl-C reaches the terminal's
foreground group), to the launcher only (`docker stop`, Kubernetes' PID 1) and to one rank;
the torch and DALI loaders (with worker processes), one process and `--gpus 0 --procs 2`.
Every case must end the same way: one step finished by every rank, a checkpoint saved, exit
code 3 (4 for the requeue signal), no traceback, no process left behind. The cases cover
every pair of (signal, target, loader, topology) values rather than the full product (which
would take ~4x the time for no new path). Also: a second signal stops at once (130) with the
last checkpoint intact; cache-teacher and prepare-data stop between shards and continue;
a run folder in use is refused, and a killed holder leaves no stale lock; workers die with
their parent under kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdeit.pipelines import dali

from tiny import TINY_MODEL

needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed")
RUN = ["--recipe", "demo", "--img-size", "32", "--batch-size", "16", "--epochs", "3", "--set", "run.progress=false",
       "--set", "aug.mix_group=8", "--set", "data.eval_batch_size=32", "--set", "run.log_every=1",
       "--set", "run.ckpt_every=1", *TINY_MODEL, "--model", "deit_tiny"]
LOADER = {"torch": ["--loader", "torch", "--set", "data.workers=1"],
          "dali": ["--loader", "dali", "--set", "data.workers=1", "--set", "data.read_workers=1"]}
PROCS = {1: [], 2: ["--gpus", "0", "--procs", "2"]}


def start(out: Path, *args: str) -> subprocess.Popen:
    """`fastdeit ARGS` as a job: a session and process group of its own."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 (closed by finish)
    return subprocess.Popen([sys.executable, "-c", "from fastdeit.cli.commands import run_app; run_app()", *args],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended with {proc.returncode} before the signal"
        assert time.monotonic() < deadline, "timed out waiting to send the signal"
        time.sleep(0.05)


def stepped(out: Path):
    metrics = out / "metrics.jsonl"
    return lambda: metrics.exists() and '"kind": "step"' in metrics.read_text()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        kids = children(todo.pop())
        out.update(kids)
        todo += kids
    return out


def send(proc: subprocess.Popen, sig: int, target: str) -> None:
    if target == "group":
        os.killpg(proc.pid, sig)
    elif target == "rank":  # one rank, as a scheduler preempting one process would
        ranks = [p for p in children(proc.pid) if b"fastdeit.runtime.launch" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert ranks, "no rank process found"
        os.kill(max(ranks), sig)
    else:  # the launcher only (the process itself when there is no worker group)
        os.kill(proc.pid, sig)


def finish(proc: subprocess.Popen, out: Path, watched: set[int]) -> tuple[int, str]:
    """The exit code and output; every process the job had is gone (a worker left behind
    would hold memory and files)."""
    try:
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (out.parent / f"{out.name}.log").read_text()
    deadline = time.monotonic() + 10
    while (alive := {p for p in watched if Path(f"/proc/{p}").exists() and _not_zombie(p)}) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes outlived the job: {alive}\n{text[-2000:]}"
    return code, text


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stopped_cleanly(out: Path, code: int, text: str, expect: int = 3) -> dict:
    """Exit code, one stop record, its checkpoint readable at the stop's update, no traceback,
    no lock left."""
    assert code == expect and "Traceback" not in text, text[-3000:]
    recs = [json.loads(x) for x in out.joinpath("metrics.jsonl").read_text().splitlines()]
    stops = [r for r in recs if r["kind"] == "stop"]
    assert len(stops) == 1, recs[-3:]
    ck = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert ck["state"]["updates"] == stops[0]["updates"]
    assert not (out / ".lock").exists() and not list(out.glob("*.tmp"))
    return stops[0]


CASES = [  # signal, target, loader, processes
    ("TERM", "group", "torch", 1), ("INT", "group", "dali", 1), ("TERM", "launcher", "dali", 1),
    ("INT", "launcher", "torch", 1),
    ("TERM", "group", "torch", 2), ("INT", "group", "dali", 2), ("TERM", "launcher", "dali", 2),
    ("INT", "launcher", "torch", 2), ("TERM", "rank", "torch", 2), ("INT", "rank", "dali", 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("sig, target, loader, procs", CASES)
def test_a_stop_ends_the_same_way_however_it_arrives(tiny_data, tmp_path, sig, target, loader, procs):
    if loader == "dali" and not dali.available():
        pytest.skip("NVIDIA DALI is not installed")
    out = tmp_path / "run"
    proc = start(out, "train", *RUN, *LOADER[loader], *PROCS[procs], "--data", str(tiny_data), "--out", str(out))
    wait_for(proc, stepped(out))
    watched = descendants(proc.pid)
    send(proc, getattr(signal, f"SIG{sig}"), target)
    code, text = finish(proc, out, watched)
    stop = stopped_cleanly(out, code, text)
    assert stop["reason"] == "stop" and "continue with --resume" in text


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_the_requeue_signal_saves_and_exits_4(tiny_data, tmp_path, procs):
    """SLURM's `--signal=USR1@120` (to the tasks, or B: to the batch shell that passes it on),
    here to the launcher only."""
    out = tmp_path / "run"
    proc = start(out, "train", *RUN, *LOADER["torch"], *PROCS[procs], "--data", str(tiny_data), "--out", str(out))
    wait_for(proc, stepped(out))
    watched = descendants(proc.pid)
    send(proc, signal.SIGUSR1, "launcher")
    code, text = finish(proc, out, watched)
    assert stopped_cleanly(out, code, text, expect=4)["reason"] == "requeue" and "requeue the job" in text


@pytest.mark.slow
@pytest.mark.parametrize("procs, target", [(1, "group"), (2, "launcher"), (2, "group")])
def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tiny_data, tmp_path, procs, target):
    """A double Ctrl-C reaches every process of the group: the launcher speaks for its ranks (it
    printed six lines, two of them twice)."""
    out = tmp_path / "run"
    proc = start(out, "train", *RUN, *LOADER["torch"], *PROCS[procs], "--data", str(tiny_data), "--out", str(out))
    wait_for(proc, stepped(out))
    wait_for(proc, lambda: (out / "checkpoint-last.pt").exists())
    watched = descendants(proc.pid)
    send(proc, signal.SIGTERM, target)
    send(proc, signal.SIGINT, target)
    code, text = finish(proc, out, watched)
    assert code == 130 and "Traceback" not in text, text[-3000:]
    said = [line for line in text.splitlines() if line.startswith(("stopping", "interrupted"))]
    assert len(said) == len(set(said)) <= 3, said
    ck = torch.load(out / "checkpoint-last.pt", weights_only=True)  # whole: written before, or atomically
    assert ck["state"]["updates"] >= 1
    if (out / ".lock").exists():  # left as kill -9 leaves it, but not held: the next start takes it
        import fcntl

        with open(out / ".lock", "a") as f:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.slow
@pytest.mark.parametrize("procs, target", [(1, "group"), (2, "launcher")])
def test_cache_teacher_stops_between_shards_and_continues(tiny_data, teacher, tmp_path, procs, target):
    out = tmp_path / "cache"
    args = ["cache-teacher", "--data", str(tiny_data), "--teacher", "resnet10t", "--teacher-ckpt", str(teacher),
            "--out", str(out), "--recipe", "demo", "--img-size", "32", "--batch-size", "16", "--epochs", "4",
            "--set", "aug.mix_group=8", "--set", "data.workers=1", "--set", "distill.cache_shard_rows=16",
            *PROCS[procs]]
    proc = start(out, *args)
    wait_for(proc, lambda: (out / "manifest.json").exists())
    watched = descendants(proc.pid)
    send(proc, signal.SIGTERM, target)
    code, text = finish(proc, out, watched)
    assert code == 3 and "Traceback" not in text and "run the same command again" in text, text[-3000:]
    proc = start(out, *args)
    code, text = finish(proc, out, set())
    assert code == 0, text[-3000:]
    assert json.loads(text.strip().splitlines()[-1])["rows"] == 4 * 4 * 16  # epochs x steps x batch


@pytest.mark.slow
def test_prepare_data_stops_between_shards_and_continues(tiny_data, tmp_path):
    out = tmp_path / "prepared"
    args = ["prepare-data", str(tiny_data), str(out), "--shard-rows", "4", "--workers", "2", "--max-side", "32"]
    proc = start(out, *args)
    wait_for(proc, lambda: (out / "job.json").exists())
    watched = descendants(proc.pid)
    send(proc, signal.SIGTERM, "group")
    code, text = finish(proc, out, watched)
    assert code == 3 and "Traceback" not in text and "the same command continues" in text, text[-3000:]
    assert not (out / "manifest.json").exists()
    code, text = finish(start(out, *args), out, set())
    assert code == 0 and (out / "manifest.json").exists(), text[-3000:]


@pytest.mark.slow
def test_a_folder_in_use_is_refused_and_a_killed_holder_leaves_no_lock(tiny_data, tmp_path):
    """Two trainings into one --out: the second is refused while the first lives (both used
    to exit 0, the first run lost). kill -9 of the holder (its loader worker is not killed: it
    dies with its parent) frees the folder at once: the next start takes it."""
    out, other = tmp_path / "run", tmp_path / "other"
    long = [*RUN, *LOADER["torch"], "--data", str(tiny_data), "--out", str(out), "--epochs", "50"]
    first = start(out, "train", *long)
    wait_for(first, stepped(out))
    code, text = finish(start(other, "train", *RUN, "--data", str(tiny_data), "--out", str(out), "--resume"),
                        other, set())
    assert first.poll() is None, "the first run ended before the second tried"
    assert code == 2 and f"{out} is in use by another run (pid {first.pid}" in text, text[-2000:]
    wait_for(first, lambda: descendants(first.pid))  # a loader worker (between epochs there may be none)
    watched = descendants(first.pid)
    os.kill(first.pid, signal.SIGKILL)  # the training process alone
    finish(first, out, watched)
    again = start(other, "train", *long, "--resume")
    wait_for(again, lambda: '"kind": "resume"' in (out / "metrics.jsonl").read_text())
    send(again, signal.SIGTERM, "group")
    code, text = finish(again, other, set())
    assert code == 3 and "in use" not in text, text[-2000:]


@pytest.mark.slow
def test_ranks_die_with_a_killed_launcher(tiny_data, tmp_path):
    """kill -9 of `fastdeit train --gpus 0 --procs 2` alone: torchrun starts each rank in a
    session of its own, so nothing else reaches them; they must not train on, writing into a
    folder that a requeued job is about to use."""
    out = tmp_path / "run"
    proc = start(out, "train", *RUN, *LOADER["torch"], *PROCS[2], "--epochs", "50", "--data", str(tiny_data),
                 "--out", str(out))
    wait_for(proc, stepped(out))
    watched = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc, out, watched)
    assert not (out / "summary.json").exists()


@needs_dali
@pytest.mark.slow
def test_dali_read_workers_die_with_a_killed_training(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = start(out, "train", *RUN, *LOADER["dali"], "--set", "data.read_workers=2", "--data", str(tiny_data),
                 "--out", str(out))
    wait_for(proc, stepped(out))
    watched = descendants(proc.pid)
    assert len(watched) >= 2, "DALI's read workers should be running"
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc, out, watched)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [("TERM", 3), ("USR1", 4)])
def test_a_stop_while_the_command_starts_is_a_stop_too(tiny_data, tmp_path, sig, code):
    """Before training watches for stops (importing torch, scanning the data: seconds, or
    minutes for a large tree), the installed `fastdeit` command already takes them: the same
    exit code and line as any stop, not death by the signal."""
    script = Path(sys.executable).with_name("fastdeit")
    if not script.exists():
        pytest.skip("the fastdeit command is not installed beside this Python")
    out = tmp_path / "run"
    log = open(tmp_path / "log", "w")  # noqa: SIM115
    proc = subprocess.Popen([str(script), "train", *RUN, "--data", str(tiny_data), "--out", str(out)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)
    wait_for(proc, lambda: _catches(proc.pid, signal.SIGTERM) and _catches(proc.pid, signal.SIGUSR1), timeout=30)
    os.killpg(proc.pid, getattr(signal, f"SIG{sig}"))
    assert proc.wait(timeout=120) == code
    text = (tmp_path / "log").read_text()
    assert "Traceback" not in text and "run the same command again" in text, text


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.parametrize("code, where, process", [(0, "teardown", "command"), (3, "teardown", "command"),
                                                   (0, "atexit", "command"), (0, "teardown", "rank")])
def test_a_stop_while_a_finished_process_exits_keeps_its_exit_code(tmp_path, code, where, process):
    """A job that has just finished is signalled while its processes end: in an atexit callback
    (torch's, DALI's), or while modules are torn down after Python's own handlers are gone
    (DALI pipelines, CUDA state). The `fastdeit` command and a rank under torchrun (whose death
    by SIGTERM torchrun reports as a failed group) end with their work's exit code, no
    traceback, not by the signal. The work here leaves a slow piece of teardown in that place."""
    marker, log = tmp_path / "ending", tmp_path / "log"
    script = f"""
import atexit, os, sys, time
import fastdeit.cli.entry, fastdeit.runtime.launch

MARK = os.open({str(marker)!r}, os.O_WRONLY | os.O_CREAT)

def slow(*_, write=os.write, sleep=time.sleep):  # builtins may be gone by then
    write(MARK, b"x")
    sleep(5)

class Slow:
    __del__ = slow

def work(*_):
    if {where!r} == "atexit":
        atexit.register(slow)
    else:
        fastdeit.runtime.launch.held = Slow()  # a module global: destroyed as modules are torn down
    return {code}

if {process!r} == "command":
    import fastdeit.cli.commands
    fastdeit.cli.commands.run_app = lambda: sys.exit(work())
    fastdeit.cli.entry.main()
else:
    fastdeit.runtime.launch.worker_main = work
    fastdeit.runtime.launch.main()
"""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        wait_for(proc, lambda: marker.exists() and marker.stat().st_size > 0, timeout=60)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == code
    assert "Traceback" not in log.read_text(), log.read_text()
