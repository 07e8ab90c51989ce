"""End to end: what a user gets from `fastdeit train` on JPEG files, against the step alone.

Generates ImageNet-shaped JPEGs (`--classes` folders x `--per-class` files of 375-500 px,
quality 90: hard links to `--distinct` generated images, as startup.py's tree), stores them
with `fastdeit prepare-data --max-side 512`, builds a replay cache of a teacher with random
weights (`fastdeit cache-teacher`; speed does not depend on the weights), then runs `fastdeit
train --gpus 1` (DALI, --compile, a distilled DeiT, hard targets replayed; on a CPU `--gpus 0
--procs 1`, the same one-worker launch) as a user would, and stops it with
SIGTERM after `--warmup` + `--steps` updates (the run's own stop: a
checkpoint and exit 3). From the run's metrics.jsonl: end-to-end train img/s and the fraction
of each step spent waiting for data. In the same call: the step alone (throughput.py's
`measure_student`: the same model, batch, attention and compile mode on random tensors) and
the ratio of the two; the GPU's utilisation from nvidia-smi during the timed steps where there
is one. Every phase's time is recorded with its size (prepare-data and cache-teacher also per
100k images). The JSON is written after every phase: a call cut short keeps what it measured.

    python benchmarks/e2e.py --device cuda --out benchmarks/results/e2e-nvidia-h200.json  # ~4 min, H200
    python benchmarks/e2e.py --tiny --out /tmp/e2e-dry.json                                # toy size, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import timm
import torch

from fastdeit.pipelines import dali
from fastdeit.report.provenance import measured_on, write_results
from fastdeit.runtime.atomic import atomic_save
from fastdeit.training.rundir import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import make_tree  # sibling scripts, as scaling.py is
from throughput import measure_student

# 12 classes: past the synthetic set's 10; 288 images: 3.6x the 80 the 5 updates take, so the
# stop lands mid-epoch as at full size (a stop as the run ends can end it by the signal, -15)
TINY = {"classes": 12, "per_class": 24, "distinct": 24, "model": "deit_tiny_distilled", "teacher": "resnet10t",
        "batch_size": 16, "img_size": 32, "steps": 3, "warmup": 2, "compile": "none", "max_side": 64, "log_every": 1}
TINY_SETS = ["model.depth=2", "model.patch_size=8", "aug.mix_group=8", "data.eval_batch_size=16"]


def cli(args: list[str], log: Path, timeout: float = 1800) -> float:
    """`fastdeit ARGS` to its end (its output in `log`); the seconds it took. A failure ends
    the benchmark with the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "fastdeit.cli.commands", *args], stdout=f,
                              stderr=subprocess.STDOUT,
                              timeout=timeout).returncode
    if code != 0:
        raise SystemExit(f"fastdeit {args[0]} failed ({code}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def plan_flags(a: argparse.Namespace) -> list[str]:
    """What the cache and the training run share: their plan."""
    sets = [*(TINY_SETS if a.tiny else []), "aug.repeated_aug=1", "sched.warmup_epochs=0", f"data.workers={a.workers}"]
    return ["--recipe", "deit", "--batch-size", str(a.batch_size), "--img-size", str(a.img_size), "--seed", "0",
            "--device", a.device, *(x for s in sets for x in ("--set", s))]


def gpu_sampler(samples: list[tuple[float, float]], stop: threading.Event) -> threading.Thread:
    """nvidia-smi's utilisation every second, as (time, percent), until `stop`."""
    def sample() -> None:
        while not stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                samples.append((time.perf_counter(), float(out.split()[0])))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread


def train_until(a: argparse.Namespace, args: list[str], run: Path, log: Path) -> dict[str, Any]:
    """Start the training run, stop it with SIGTERM after warmup + steps updates; what its
    metrics.jsonl says of the timed steps."""
    metrics, target = RunDir(run).metrics, a.warmup + a.steps
    samples: list[tuple[float, float]] = []
    stop, t0 = threading.Event(), time.perf_counter()
    sampler = gpu_sampler(samples, stop) if a.device == "cuda" else None
    first = timed_from = None
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "fastdeit.cli.commands", *args], stdout=f,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                steps = [r for r in _records(metrics) if r["kind"] == "step"]
                first = first or (time.perf_counter() - t0 if steps else None)
                if timed_from is None and steps and steps[-1]["updates"] >= a.warmup:
                    timed_from = time.perf_counter()
                if steps and steps[-1]["updates"] >= target:
                    os.killpg(proc.pid, signal.SIGTERM)  # the run's own stop: after this step, saved, exit 3
                    break
                time.sleep(0.2)
            code = proc.wait(timeout=600)
        finally:
            stop.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    if sampler:
        sampler.join(timeout=15)
    if code not in (0, 3):
        raise SystemExit(f"fastdeit train ended with {code}:\n{log.read_text()[-3000:]}")
    timed = [r for r in _records(metrics) if r["kind"] == "step" and a.warmup < r["updates"] <= target]
    if not timed:
        raise SystemExit(f"no logged step after the warm-up: use a larger data set or fewer --warmup/--steps\n"
                         f"{log.read_text()[-2000:]}")
    rates = [r["img_s"] for r in timed]
    util = [u for t, u in samples if timed_from is not None and t >= timed_from]
    return {"exit_code": code, "first_step_s": first, "timed_updates": timed[-1]["updates"] - a.warmup,
            # each window holds the same number of images: the overall rate is their harmonic mean
            "train_img_s": len(rates) / sum(1 / r for r in rates), "window_img_s": rates,
            "data_wait": sum(r["data_wait"] for r in timed) / len(timed),
            "gpu_util_percent": sum(util) / len(util) if util else None, "gpu_util_samples": len(util)}


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def step_only(a: argparse.Namespace) -> dict[str, Any]:
    """The training step of the same model, batch, attention and compile mode on random tensors."""
    opts = argparse.Namespace(patch_size=8 if a.tiny else 16, depth=2 if a.tiny else 0, img_size=a.img_size,
                              steps=max(a.steps, 5), warmup=max(2, a.warmup // 3), repeats=3)
    row = measure_student(opts, a.model, a.batch_size, a.attn, a.compile, torch.device(a.device))
    return {k: row[k] for k in ("train_img_s", "train_img_s_spread", "mfu", "peak_memory_gib", "compile")}


def run(a: argparse.Namespace, report: dict[str, Any], save) -> None:
    work = a.work or Path(tempfile.mkdtemp(prefix="fastdeit-e2e-"))
    src, prep, cache, out = work / "jpeg", work / "prepared", work / "cache", work / "run"
    t0, images = time.perf_counter(), a.classes * a.per_class
    make_tree(src, images, a.distinct, a.classes)
    report["phases"]["make_data"] = {"s": time.perf_counter() - t0, "images": images, "distinct": a.distinct}
    save()
    s = cli(["prepare-data", str(src), str(prep), "--max-side", str(a.max_side)], work / "prepare.log")
    report["phases"]["prepare_data"] = {"s": s, "images": images, "s_per_100k": s * 1e5 / images}
    save()
    torch.manual_seed(0)
    atomic_save(timm.create_model(a.teacher, num_classes=a.classes).state_dict(), work / "teacher.pt")
    teacher = ["--teacher", a.teacher, "--teacher-ckpt", str(work / "teacher.pt")]
    s = cli(["cache-teacher", "--data", str(prep), *teacher, "--out", str(cache), "--mode", "replay", "--epochs", "1",
             *plan_flags(a)], work / "cache.log")
    rows = images // a.batch_size * a.batch_size
    report["phases"]["cache_teacher"] = {"s": s, "rows": rows, "s_per_100k": s * 1e5 / rows}
    save()
    RunDir(out).remove()
    loader = a.loader if a.loader != "dali" or dali.available() else "torch"
    args = ["train", "--data", str(prep), "--model", a.model, "--out", str(out), "--epochs", "1", *plan_flags(a),
            "--distill", "hard", *teacher, "--targets", "replay", "--teacher-cache", str(cache), "--loader", loader,
            "--attn", a.attn, "--compile", a.compile, "--set", f"run.log_every={a.log_every}",
            "--set", "run.ckpt_every=0", "--set", "run.progress=false", "--set", f"data.read_workers={a.read_workers}"]
    # as a user launches it: one GPU, or on a CPU one worker (one worker runs without torchrun)
    args = [*args, "--gpus", "1"] if a.device == "cuda" else [*args, "--gpus", "0", "--procs", "1"]
    report["command_train"] = "fastdeit " + " ".join(args).replace(str(work), "WORK")
    report["e2e"] = {"loader": loader, **train_until(a, args, out, work / "train.log")}
    save()
    report["step_only"] = step_only(a)
    report["e2e_vs_step_only"] = report["e2e"]["train_img_s"] / report["step_only"]["train_img_s"]
    save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=64, help="images per class (64 x 1000: 4x the timed steps)")
    p.add_argument("--distinct", type=int, default=1000, help="generated JPEGs the tree's files are links to")
    p.add_argument("--model", default="deit_small_distilled")
    p.add_argument("--teacher", default="regnety_160")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=60, help="timed updates, after --warmup")
    p.add_argument("--warmup", type=int, default=30, help="updates before the clock (compilation, DALI's start)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--loader", default="dali", help="dali (torch where DALI is not installed) or torch")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--compile", default="auto")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="DALI threads / DataLoader workers")
    p.add_argument("--read-workers", type=int, default=2)
    p.add_argument("--max-side", type=int, default=512, help="prepare-data's longest side")
    p.add_argument("--work", type=Path, default=None, help="where the data, cache and run go (default: a temp folder)")
    p.add_argument("--tiny", action="store_true", help="toy size on a CPU (what the tests run)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.tiny:
        for k, v in TINY.items():
            setattr(a, k, v)
        a.device, a.workers, a.read_workers = "cpu", 1, 1
    if a.classes * a.per_class < (a.warmup + a.steps) * a.batch_size:
        p.error("the data set is smaller than warm-up + timed steps: raise --per-class")
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report: dict[str, Any] = {"benchmark": "e2e", **measured_on(torch.device(a.device)), "command": command,
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                              "phases": {}}
    run(a, report, lambda: write_results(report, a.out))
    e2e, step = report["e2e"], report["step_only"]
    print(f"end to end {e2e['train_img_s']:.0f} img/s (data wait {e2e['data_wait']:.0%}), step alone "
          f"{step['train_img_s']:.0f} img/s: {report['e2e_vs_step_only']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
