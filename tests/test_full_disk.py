"""A full disk, as it arrives: a small file system (tmpfs, mounted by the test) that fills up
while fastdeit writes. Every writer meets it the same way: one line naming the folder and the
space, exit code 2, no temporary file left, the last good state intact, and the same command
working once space is freed. Skipped where a tmpfs cannot be mounted (not root, no
CAP_SYS_ADMIN), with that reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import TINY_MODEL, TINY_RUN

ROOT = Path(__file__).resolve().parents[1]


def _mount(folder: Path, size: str) -> None:
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                         text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'mount failed'}): needs root and "
                    f"CAP_SYS_ADMIN")


@pytest.fixture
def disk(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    _mount(folder, "64m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """A file taking all the space but `leave` bytes (tmpfs counts in pages)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    if leave:
        with open(filler, "r+b") as f:
            f.truncate(max(0, filler.stat().st_size - leave))
    return filler


def fastdeit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastdeit.cli.commands", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return fastdeit("train", *TINY_RUN, *TINY_MODEL, "--data", str(data), "--model", "deit_tiny", "--out", str(out),
                    *extra)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


def test_a_checkpoint_on_a_full_disk_keeps_the_last_one_and_resumes(tiny_data, disk):
    out = disk / "run"
    assert train(tiny_data, out, "--epochs", "2").returncode == 0
    last = (out / "checkpoint-last.pt").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    filler = fill(disk)

    res = train(tiny_data, out, "--epochs", "3", "--resume")  # the lock is taken on the full disk too
    line = one_error_line(res)
    assert line.startswith(f"error: cannot write {out}/") and f"the disk holding {out} is full" in line, line
    assert "free some space, then run the same command" in line
    assert not list(out.glob("*.tmp")), sorted(p.name for p in out.iterdir())
    assert (out / "checkpoint-last.pt").read_bytes() == last  # the last good state
    text = (out / "metrics.jsonl").read_text()
    assert text.startswith(metrics) and text.endswith("\n")  # whole lines only
    assert all(json.loads(x) for x in text.splitlines())

    filler.unlink()
    assert train(tiny_data, out, "--epochs", "3", "--resume").returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3


def test_every_other_writer_meets_a_full_disk_in_one_line(tiny_data, disk, tmp_path):
    """A cache shard, a prepared set, a report, an export, make-data: each
    stops with one line and leaves no temporary file where its output goes."""
    run = tmp_path / "run"
    assert train(tiny_data, run, "--epochs", "1").returncode == 0
    fill(disk, leave=4096)
    commands = {
        "cache": ("cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(run / "checkpoint-last.pt"),
                  "--out", str(disk / "cache"), "--epochs", "1", *TINY_RUN),
        "prepared": ("prepare-data", str(tiny_data), str(disk / "prepared")),
        "report": ("report", str(run), "--out", str(disk / "report.html")),
        "export": ("export", str(run / "checkpoint-last.pt"), "--format", "safetensors", "--out",
                   str(disk / "export")),
        "make-data": ("make-data", str(disk / "made"), "--train-per-class", "200"),
    }
    for name, args in commands.items():
        res = fastdeit(*args)
        line = one_error_line(res)
        assert "full" in line or "No space" in line or "space" in line, (name, line)
        left = [p for p in disk.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
        assert not left, (name, left)
    assert not (disk / "export").exists()  # no half export to be read back
