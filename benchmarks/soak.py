"""Soak of fault tolerance: runs killed at random moments and restarted until they finish
must end exactly as runs never killed.

Per scenario: an uninterrupted reference run, then the same command as a victim in its own
process group (as a job under a scheduler), killed with SIGKILL or SIGTERM (to the launcher,
its process group or one rank process) after a random delay (a quarter of them within the
start-up, the rest uniform over the expected time of the work left, so kills land in training,
evaluation and checkpoint writes too), and started again (`--resume` for training, the same
command for the data builds) until it exits 0; a finished victim is followed by a new one
until the kills are spent. Then compared with the reference: checkpoint weights, each step's loss (by epoch and step,
the last record winning), summary.json's top-1/top-5, every file of a teacher cache or a
prepared data set (names and bytes), and names the reference lacks (stray files). Recorded:
each kill (signal, target, delay, the exit code seen, the run's phase), restarts,
differences, and defects (a hang, processes outliving their launcher, a start that fails
without being killed). Scenarios: train (one process), train-procs2 (`--gpus 0 --procs 2`:
two CPU ranks through torchrun), cache-teacher (replay, a random resnet10t), prepare-data.
Writes --results after every scenario; exits 1 when any difference or defect was found.

    python benchmarks/soak.py --kills 40 --seed 0      # 48 starts of 5-20 s each on 2 CPU cores
    python benchmarks/soak.py --kills 3 --scenarios train --images 16 --epochs 2   # toy size
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdeit.data.synthetic import SyntheticSet, write_synthetic
from fastdeit.report.provenance import measured_on, write_results
from fastdeit.training.rundir import RunDir, read_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import alive, descendants, ranks, read  # a sibling script, as scaling.py is

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("train", "train-procs2", "cache-teacher", "prepare-data")
CLASSES = 3
GRACE_S = 10.0  # how long the processes of a dead launcher may take to notice and exit
POLL_S = 0.05
# The tiny run of the tests (tests/tiny.py): a 2-block DeiT at 32 px, batch 16.
PLAN = ["--recipe", "demo", "--img-size", "32", "--batch-size", "16", "--set", "aug.mix_group=8",
        "--set", "data.workers=0"]
TINY = [*PLAN, "--model", "deit_tiny", "--set", "model.depth=2", "--set", "model.embed_dim=32",
        "--set", "model.num_heads=2", "--set", "model.patch_size=8", "--set", "run.progress=false",
        "--set", "data.eval_batch_size=32", "--set", "run.eval_every=1", "--set", "run.ckpt_every=1",
        "--set", "run.log_every=1"]


@dataclass(frozen=True)
class Scenario:
    name: str
    args: Callable[[Path], list[str]]  # the fastdeit arguments that write into a folder
    training: bool = True  # a run folder (else a folder compared file by file)
    ranks: bool = False  # rank processes to kill

    def command(self, out: Path, restart: bool) -> list[str]:
        resume = ["--resume"] if restart and self.training else []  # alone: the last checkpoint, or a start
        return [sys.executable, "-m", "fastdeit.cli.entry", *self.args(out), *resume]  # as the installed command


def scenarios(work: Path, data: Path, epochs: int) -> dict[str, Scenario]:
    train = ["train", *TINY, "--data", str(data), "--epochs", str(epochs)]
    return {s.name: s for s in (
        Scenario("train", lambda out: [*train, "--out", str(out)]),
        Scenario("train-procs2", lambda out: [*train, "--out", str(out), "--gpus", "0", "--procs", "2"], ranks=True),
        Scenario("cache-teacher", lambda out: [
            "cache-teacher", *PLAN, "--data", str(data), "--teacher", "resnet10t", "--teacher-ckpt",
            str(work / "teacher.pth"), "--out", str(out), "--epochs", str(epochs),
            "--set", "distill.cache_shard_rows=16"], training=False),
        Scenario("prepare-data", lambda out: ["prepare-data", str(data), str(out), "--shard-rows", "8",
                                              "--workers", "2"], training=False))}


@dataclass(frozen=True)
class Kill:
    signal: str
    target: str  # launcher | group | rank
    delay: float  # into the expected timeline: start-up, then the work left
    start_up: float  # the expected start-up
    rank: int = 0

    def due(self, first_output: float | None) -> float:
        """Seconds after the start: `delay`, or, for a kill past start-up, as long after this
        start's first output (start-up times vary much more than the work's)."""
        if self.delay < self.start_up:
            return self.delay
        return math.inf if first_output is None else first_output + self.delay - self.start_up


def strike(pid: int, kill: Kill) -> str:
    """Send the kill; what it reached."""
    sig = signal.Signals[kill.signal]
    running = ranks(pid) if kill.target == "rank" else {}
    rank = kill.rank if kill.rank in running else min(running, default=None)
    try:
        if kill.target == "group":
            os.killpg(pid, sig)
            return "group"
        os.kill(running[rank] if rank is not None else pid, sig)
    except ProcessLookupError:
        return "nothing (it had exited)"
    return f"rank {rank}" if rank is not None else "launcher" + " (no rank running yet)" * (kill.target == "rank")


def attempt(cmd: list[str], out: Path, env: dict[str, str], log: Path, timeout: float, kill: Kill | None = None,
            phase: Callable[[], str] = str, started: Callable[[], bool] = bool) -> dict[str, Any]:
    """Run `cmd` (writing into `out`) in its own session, kill it when `kill` is due, wait for
    it and every process it started: its exit code, seconds, what the kill hit, defects."""
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                start_new_session=True)
    seen: dict[int, str] = {}
    res: dict[str, Any] = {"defects": [], "first_output_s": None}
    while proc.poll() is None and (now := time.monotonic() - t0) < timeout:
        seen.update(descendants(proc.pid))
        if res["first_output_s"] is None and started():
            res["first_output_s"] = now
        if kill and "hit" not in res and now >= kill.due(res["first_output_s"]):
            res["phase"], res["sent_s"] = phase(), now  # read before the kill: what the run had done
            res["hit"] = strike(proc.pid, kill)
        time.sleep(POLL_S)
    if proc.poll() is None:  # a hang: nothing may outlive the soak
        res["defects"].append(f"hang: fastdeit {cmd[3]} did not exit within {timeout:.0f} s ({log})")
        os.killpg(proc.pid, signal.SIGKILL)
    res["rc"], res["seconds"] = proc.wait(), time.monotonic() - t0
    res["defects"] += reap(seen, out, log)
    res["said"] = (log.read_text(errors="replace").strip().splitlines() or [""])[-1][:240]  # its last line
    return res


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file's size and time: what a write changes."""
    found = {}
    for name, path in files(folder).items():
        with contextlib.suppress(OSError):  # a temporary file renamed meanwhile
            found[name] = path.stat().st_size, path.stat().st_mtime_ns
    return found


def reap(seen: dict[int, str], out: Path, log: Path) -> list[str]:
    """Wait for the processes the launcher started: torchrun starts each rank in its own
    session, so a kill of the launcher's group does not reach them. One that outlives it by
    GRACE_S (then killed), or writes into `out` once it is gone, is a defect."""
    if not (orphans := {p: c for p, c in seen.items() if alive(p, c)}):
        return []
    before, deadline = snapshot(out), time.monotonic() + GRACE_S
    while (left := {p: c for p, c in orphans.items() if alive(p, c)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    what = f"{len(orphans)} process(es) of a dead launcher ({next(iter(orphans.values()))[:100]}...)"
    return [f"orphans: {what} outlived it by {GRACE_S:.0f} s ({log})"] * bool(left) + \
        [f"orphans: {what} wrote into {out} after it died ({log})"] * (snapshot(out) != before)


# --- progress and comparisons ----------------------------------------------------------------

def records(run: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """metrics.jsonl's records, and what is wrong with lines that are not JSON."""
    recs, bad = [], []
    for n, line in enumerate(read(str(RunDir(run).metrics)).splitlines(), 1):
        try:
            recs.append(json.loads(line))
        except ValueError:
            bad.append(f"metrics.jsonl line {n} is not JSON: {line[:80]!r}")
    return recs, bad


def files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def done(sc: Scenario, out: Path) -> int:
    """Units of work on disk: updates logged (training), files written (the data builds)."""
    if sc.training:
        return max((r.get("updates", 0) for r in records(out)[0] if r.get("kind") == "step"), default=0)
    return len(files(out))


def mark(sc: Scenario, out: Path) -> int:
    """Grows with every record or file written: a start has ended its start-up once it grew."""
    return len(records(out)[0]) if sc.training else len(files(out))


def phase(sc: Scenario, out: Path, before: int, total: int, last_step: int) -> str:
    """What the run was doing, as far as its last metrics record (or its files) tell."""
    if not sc.training:
        return f"{len(files(out))} of {total} files written" + " (none by this start)" * (mark(sc, out) <= before)
    recs = records(out)[0]
    if len(recs) <= before:  # nothing logged by this start yet
        return "start-up"
    kind, epoch, step = recs[-1].get("kind"), recs[-1].get("epoch"), recs[-1].get("step")
    if kind == "step":
        return f"end of epoch {epoch} (checkpoint, evaluation)" if step == last_step else f"training (epoch {epoch})"
    return {"epoch": f"epoch {epoch} evaluated (checkpoint)", "resume": f"resumed at epoch {epoch} step {step}",
            "stop": "stopping"}.get(kind, str(kind))


def compare_runs(ref: Path, vic: Path) -> dict[str, Any]:
    diffs, worst = [], 0.0
    for name in (RunDir(ref).last.name, RunDir(ref).best.name):
        if not (vic / name).exists():
            continue  # a missing file is said below
        a, b = (read_weights(r / name)[0] for r in (ref, vic))
        if a.keys() != b.keys():
            diffs.append(f"{name}: other parameter names")
            continue
        gap = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        worst = gap if name == RunDir(ref).last.name else worst
        if not all(torch.equal(a[k], b[k]) for k in a):
            diffs.append(f"{name}: weights differ (max abs difference {gap:.3g})")
    (ra, _), (rb, bad) = records(ref), records(vic)
    la, lb = ({(r["epoch"], r["step"]): r["loss"] for r in rs if r.get("kind") == "step"} for rs in (ra, rb))
    diffs += bad + [f"step losses: {len(la.keys() ^ lb.keys())} (epoch, step) keys differ"] * (la.keys() != lb.keys())
    if unequal := [k for k in la.keys() & lb.keys() if la[k] != lb[k]]:
        diffs.append(f"step losses differ at {len(unequal)} steps, first {min(unequal)} "
                     f"(max abs difference {max(abs(la[k] - lb[k]) for k in unequal):.3g})")
    if RunDir(vic).summary.exists():
        sa, sb = (json.loads(RunDir(r).summary.read_text()) for r in (ref, vic))
        diffs += [f"summary {k}: {sa.get(k)} vs {sb.get(k)}" for k in ("top1", "top5") if sa.get(k) != sb.get(k)]
    return {"max_abs_weight_difference": worst, "steps": len(la), "differences": diffs + strays(ref, vic)}


def compare_files(ref: Path, vic: Path) -> dict[str, Any]:
    fa, fb = files(ref), files(vic)
    same = sorted(fa.keys() & fb.keys())
    differ = [f"{n} differs" for n in same if fa[n].read_bytes() != fb[n].read_bytes()]
    return {"files_compared": len(same), "differences": differ + strays(ref, vic)}


def strays(ref: Path, vic: Path) -> list[str]:
    fa, fb = files(ref), files(vic)
    return [f"stray file {n}" for n in sorted(fb.keys() - fa.keys())] + \
        [f"missing file {n}" for n in sorted(fa.keys() - fb.keys())]


STARTUP_SHARE = 0.25  # of the kills drawn within the start-up (--startup-share)


def set_startup_share(share: float) -> None:
    global STARTUP_SHARE
    STARTUP_SHARE = share


def run_scenario(sc: Scenario, kills: int, seed: int, work: Path, env: dict[str, str]) -> dict[str, Any]:
    folder = work / sc.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ref = folder / "reference"
    first = attempt(sc.command(ref, False), ref, env, folder / "reference.log", timeout=900,
                    started=lambda: mark(sc, ref) > 0)
    result: dict[str, Any] = {"reference": {k: first[k] for k in ("rc", "seconds", "first_output_s")},
                              "kills": [], "restarts": 0, "defects": first["defects"], "differences": []}
    if first["rc"] != 0:
        result["defects"].append(f"the reference run failed (exit {first['rc']}): {first['said']}")
        return result
    rng, misses, n = random.Random(f"{seed}:{sc.name}"), 0, 0
    # A run that finishes ends its victim: new victims are started until the kills are spent,
    # so that kills land in every phase of a run, not only in the first victim's early ones.
    while len(result["kills"]) < kills and misses < 3:
        vic, had = folder / f"victim-{n}", len(result["kills"])
        if not victim(sc, kills - had, rng, first, folder, vic, env, result):
            break
        got = (compare_runs if sc.training else compare_files)(ref, vic)
        result["differences"] += [f"{vic.name}: {d}" for d in got.pop("differences")]
        for key, value in got.items():  # the worst over the victims
            result[key] = max(result.get(key, value), value)
        result["files"] = {"reference": sorted(files(ref)), "victim": sorted(files(vic))}
        result["victims"] = n = n + 1
        misses = misses + 1 if len(result["kills"]) == had else 0
    return result


def victim(sc: Scenario, kills: int, rng: random.Random, first: dict[str, Any], folder: Path, vic: Path,
           env: dict[str, str], result: dict[str, Any]) -> bool:
    """Start, kill and restart the victim until it finishes (True) or fails unkilled (False)."""
    ref = folder / "reference"
    total, seconds = done(sc, ref), first["seconds"]
    last_step = max((r["step"] for r in records(ref)[0] if r.get("kind") == "step"), default=-1)
    start_up = min(first["first_output_s"] or 0.0, seconds)
    train_s = seconds - start_up
    targets = ("launcher", "group", "rank") if sc.ranks else ("launcher", "group")
    for n in range(kills + 1):  # every kill, then a start that is not killed
        kill = None
        if n < kills:  # a quarter in start-up, the rest uniform over the expected time of the work left
            left = 0.9 * train_s * max(0.1, 1 - done(sc, vic) / max(total, 1))  # 0.9: seldom past the end
            delay = rng.uniform(0, start_up) if rng.random() < STARTUP_SHARE else start_up + rng.uniform(0, left)
            kill = Kill(rng.choice(["SIGKILL", "SIGTERM"]), rng.choice(targets), delay, start_up, rng.randrange(2))
        before = mark(sc, vic)
        got = attempt(sc.command(vic, n > 0), vic, env, folder / f"{vic.name}-{n}.log", 3 * seconds + 120, kill,
                      phase=lambda b=before: phase(sc, vic, b, total, last_step),
                      started=lambda b=before: mark(sc, vic) > b)
        result["restarts"] += int(n > 0)
        result["defects"] += got["defects"]
        hit = kill is not None and not got.get("hit", "nothing").startswith("nothing")
        if hit:
            result["kills"].append(rec := {"signal": kill.signal, "target": got["hit"], "exit_code": got["rc"],
                                           "delay_s": round(got["sent_s"], 2), "phase": got["phase"],
                                           "said": got["said"]})
            print(f"{sc.name:14s} kill {len(result['kills'])}/{kills}: {kill.signal} to {rec['target']} after "
                  f"{rec['delay_s']:.1f} s ({rec['phase']}): exit {got['rc']}", flush=True)
        if got["rc"] == 0 and (RunDir(vic).summary if sc.training else vic / "manifest.json").exists():
            result["unsent"] = int(kill is not None and not hit)  # the run ended before its kill
            return True
        if not hit:  # not killed and not finished: every next start would fail the same way
            result["defects"].append(f"a start that was not killed failed (exit {got['rc']}, after "
                                     f"{len(result['kills'])} kills): {got['said']} ({folder}/{vic.name}-{n}.log)")
            return False
    return False  # not reached: the last start is not killed


def prepare(work: Path, images: int, which: list[str]) -> Path:
    """The synthetic data set (made once per size) and, for cache-teacher, a random teacher."""
    data = write_synthetic(work / f"data-{images}", SyntheticSet(classes=CLASSES, train_per_class=images,
                                                                 val_per_class=6, seed=7))
    if "cache-teacher" in which:
        import timm

        torch.manual_seed(0)
        torch.save(timm.create_model("resnet10t", num_classes=CLASSES).state_dict(), work / "teacher.pth")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=40, help="kills in all, spread over the scenarios")
    p.add_argument("--seed", type=int, default=0, help="of the kills' signals, targets and delays")
    p.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temp folder)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"a comma-separated subset of {SCENARIOS}")
    p.add_argument("--images", type=int, default=48, help="training images per class (3 classes, 6 val each)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--startup-share", type=float, default=STARTUP_SHARE,
                   help="of the kills within the start-up (1: every kill lands, whatever the machine's speed)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "soak-cpu-2core.json")
    a = p.parse_args(argv)
    set_startup_share(a.startup_share)
    which = [s for s in a.scenarios.split(",") if s]
    if not which or set(which) - set(SCENARIOS):
        p.error(f"--scenarios {a.scenarios!r}: pick from {', '.join(SCENARIOS)}")
    work = a.work or Path(tempfile.mkdtemp(prefix="fastdeit-soak-"))  # write_synthetic makes a new one
    # The runs' stored data indexes go to the work folder; fault hooks of the tests stay off.
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDEIT_KILL_AT", "FASTDEIT_TERM_AT")}
    env.update(FASTDEIT_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1")
    found = scenarios(work, prepare(work, a.images, which), a.epochs)
    command = " ".join(["benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])])
    report: dict[str, Any] = {"benchmark": "soak", **measured_on(torch.device("cpu")), "command": command,
                              "settings": {"seed": a.seed, "images_per_class": a.images, "classes": CLASSES,
                                           "epochs": a.epochs}, "scenarios": {}}
    print(f"soak: {a.kills} kills over {', '.join(which)}; runs in {work}", flush=True)
    for i, name in enumerate(which):
        share = a.kills // len(which) + (i < a.kills % len(which))
        res = report["scenarios"][name] = run_scenario(found[name], share, a.seed, work, env)
        runs = report["scenarios"].values()
        kills, diffs = sum(len(r["kills"]) for r in runs), sum(len(r["differences"]) for r in runs)
        exact = sum(len(r["kills"]) for r in runs if not r["differences"] and not r["defects"])
        report["defects"] = [d for r in runs for d in r["defects"]]
        report["result"] = f"{kills} kills, {exact} survived exactly, {diffs} differences"
        write_results(json.loads(json.dumps(report).replace(str(work), "WORK")), a.results)  # no machine paths
        print(f"{name:14s} {len(res['kills'])} kills, {res['restarts']} restarts; "
              f"differences: {res['differences'] or 'none'}; defects: {res['defects'] or 'none'}", flush=True)
    print(report["result"] + f", {len(report['defects'])} defects; results in {a.results}")
    return 1 if diffs or report["defects"] else 0


if __name__ == "__main__":
    sys.exit(main())
