"""Data-parallel scaling of the training step: img/s with 1 and P processes (torchrun, DDP),
and the time per step an all-reduce of the gradients takes. Weak scaling: the per-rank
batch is fixed, as when GPUs are added to a run. Also the projection of whole runs from a
measured single-device step and a documented or measured all-reduce bus bandwidth.

    python benchmarks/throughput.py --section scaling --device cpu --procs 1,2
    python benchmarks/throughput.py --section scaling --device cuda --procs 1,8 --models deit_small_distilled
    python benchmarks/scaling.py --project --img-s IMG_S --model deit_small_distilled   # the arithmetic only
    python benchmarks/scaling.py --project --img-s IMG_S --model deit3_base --phases 800@192,20@224

This file is also the worker torchrun starts (`--worker`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastdeit.report.provenance import measured_on, write_results

IMAGENET_TRAIN = 1_281_167
# All-reduce bus bandwidths (nccl-tests' busbw, large messages), GB/s. Within an 8×H100 SXM
# node (NVLink 4 / NVSwitch): 460, the low end of the 460-480 that published nccl-tests
# reference tables give. Across nodes: an assumption, not a measurement: 80% of one 400 Gb/s
# NDR InfiniBand port per GPU (40 GB/s); NCCL's tree/SHARP algorithms can do better.
DOCUMENTED_BUSBW = {"1 node x 8 H100 (NVLink)": (8, 460.0), "4 nodes x 8 H100 (IB NDR 400G per GPU)": (32, 40.0)}


def worker(a: argparse.Namespace) -> None:
    """One rank: DDP student, random batches, timed steps; rank 0 writes the JSON."""
    import torch.distributed as dist

    from fastdeit.config.recipes import recipe
    from fastdeit.config.schema import with_section
    from fastdeit.models.factory import build_model
    from fastdeit.runtime.device import amp_dtype
    from fastdeit.training.build import make_optimizer
    from fastdeit.training.step import Prepared, make_step

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(a.device, int(os.environ.get("LOCAL_RANK", 0)) if a.device == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = with_section(recipe("deit"), "model", name=a.model, patch_size=a.patch_size, drop_path=0.1)
    cfg = with_section(cfg, "distill", mode="hard")
    torch.manual_seed(0)
    model = build_model(cfg.model, 1000, a.img_size).to(device)
    net = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True,
                                                    device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    amp = amp_dtype("auto", device)
    step = make_step(cfg, device, amp, 1000, model=net, optimizer=make_optimizer(cfg, model, device), rank=rank)
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(a.batch, 3, a.img_size, a.img_size, device=device, generator=g)
    y = torch.softmax(torch.randn(a.batch, 1000, device=device, generator=g), 1)
    t = torch.randint(0, 1000, (a.batch,), device=device, generator=g)
    batch = Prepared(images=x, soft_labels=y, teacher=t, plan=None, bad=())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()

    rates = []
    for _ in range(a.repeats):
        for _ in range(a.warmup):
            step.update(batch, 1)
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step.update(batch, 1)
        sync()
        rates.append(a.steps * a.batch * world / (time.perf_counter() - t0))
    grad_numel = sum(p.numel() for p in model.parameters())
    allreduce_ms = allreduce_time(grad_numel, device, a.warmup, a.steps, sync) if world > 1 else None
    if rank == 0:
        Path(a.worker).write_text(json.dumps({
            "procs": world, "img_s": float(np.median(rates)), "img_s_spread": [min(rates), max(rates)],
            "step_ms": 1e3 * a.batch * world / float(np.median(rates)), "allreduce_ms": allreduce_ms,
            "grad_mb": grad_numel * 4 / 1e6, "threads_per_proc": torch.get_num_threads()}))
    if world > 1:
        dist.destroy_process_group()


def allreduce_time(numel: int, device: torch.device, warmup: int, steps: int, sync) -> float:
    """Median milliseconds of an all-reduce of `numel` fp32 values in one flat buffer: the
    gradients' bytes, what DDP's buckets move per step."""
    import torch.distributed as dist

    flat = torch.zeros(numel, device=device)
    times = []
    for k in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        sync()
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def scaling_section(a: argparse.Namespace, device: torch.device, console) -> list[dict]:
    """Run the worker under torchrun for each process count of --procs."""
    rows = []
    cores = os.cpu_count() or 1
    for procs in map(int, a.procs.split(",")):
        for model in a.models.split(","):
            console.print(f"scaling: {model}, {procs} process(es) ...")
            out = Path(tempfile.mkdtemp(prefix="fastdeit-scaling-")) / "r.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                   __file__, "--worker", str(out), "--device", device.type, "--model", model,
                   "--img-size", str(a.img_size), "--patch-size", str(a.patch_size),
                   "--batch", a.batch_sizes.split(",")[0], "--steps", str(a.steps), "--warmup", str(a.warmup),
                   "--repeats", str(a.repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0 or not out.exists():
                tail = (res.stderr.strip().splitlines() or ["?"])[-1]
                console.print(f"  failed: {tail[:200]}")
                rows.append({"model": model, "procs": procs, "error": tail[:300]})
                continue
            rows.append({"model": model, "per_rank_batch": int(a.batch_sizes.split(",")[0]),
                         **json.loads(out.read_text())})
    for r in rows:  # efficiency against one process of the same model
        base = next((b for b in rows if b.get("procs") == 1 and b["model"] == r["model"] and "img_s" in b), None)
        if base and "img_s" in r:
            r["speedup"] = r["img_s"] / base["img_s"]
            r["efficiency"] = r["speedup"] / r["procs"]
    return rows


def allreduce_seconds(params: float, ranks: int, busbw_gbs: float, bytes_per_param: int = 4) -> float:
    """Ring all-reduce time of the gradients: 2 (N-1)/N x bytes / bus bandwidth."""
    return 2 * (ranks - 1) / ranks * params * bytes_per_param / (busbw_gbs * 1e9)


def project(model: str, img_s: float | None, epochs: int = 300) -> list[dict]:
    """Projected wall time of `epochs` ImageNet-1k epochs at each documented topology, from a
    single-device training img/s (None: only the communication term can be computed)."""
    from fastdeit.config.schema import ModelConfig
    from fastdeit.models.factory import build_model

    params = sum(p.numel() for p in build_model(ModelConfig(name=model), 1000, 224).parameters())
    rows = []
    for name, (ranks, busbw) in DOCUMENTED_BUSBW.items():
        comm = allreduce_seconds(params, ranks, busbw)
        row = {"topology": name, "ranks": ranks, "busbw_gbs": busbw, "params_m": params / 1e6,
               "allreduce_ms_per_step": comm * 1e3}
        if img_s:
            step = 256 / img_s  # per-rank batch 256 (global 8 × 256 = 2048 on one node)
            # No overlap assumed: an upper bound; DDP overlaps most of the all-reduce with backward.
            row["step_ms"] = step * 1e3
            row["hours"] = epochs * IMAGENET_TRAIN / (ranks * 256) * (step + comm) / 3600
        rows.append(row)
    return rows


def parse_phases(text: str) -> list[tuple[int, int]]:
    """'800@192,20@224' -> [(800, 192), (20, 224)]: epochs at an image size, in order."""
    try:
        phases = [tuple(int(v) for v in part.split("@")) for part in text.split(",")]
    except ValueError:
        phases = []
    if not phases or any(len(p) != 2 or min(p) < 1 for p in phases):
        raise SystemExit(f"--phases {text!r}: give EPOCHS@PX[,EPOCHS@PX...], e.g. 800@192,20@224")
    return phases


def project_phases(model: str, phases: list[tuple[int, int]], img_s: float, at_px: int) -> dict:
    """A recipe of phases (epochs at an image size, e.g. DeiT III's 800 at 192 px, then 20 at
    224) at each documented topology. The single-device img/s was measured at `at_px`; at another
    size it is scaled by the ratio of forward FLOPs, an estimate that holds where the step's
    time follows its FLOPs (each row says which it is)."""
    from throughput import forward_gmacs  # a sibling script

    from fastdeit.config.schema import ModelConfig
    from fastdeit.models.factory import build_model

    gmacs = {px: forward_gmacs(build_model(ModelConfig(name=model), 1000, px), px, torch.device("cpu"))
             for px in dict.fromkeys([at_px, *(px for _, px in phases)])}
    rows = []
    for epochs, px in phases:
        rate = img_s if px == at_px else img_s * gmacs[at_px] / gmacs[px]
        for row in project(model, rate, epochs):
            rows.append({"phase": f"{epochs}@{px}", "epochs": epochs, "img_size": px, "forward_gmacs": gmacs[px],
                         "img_s": rate, "img_s_from": "measured" if px == at_px else f"scaled by FLOPs from {at_px} px",
                         **row})
    totals = {t: sum(r["hours"] for r in rows if r["topology"] == t) for t in DOCUMENTED_BUSBW}
    return {"model": model, "img_s": img_s, "at_px": at_px, "phases": rows, "hours": totals}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", default=None, help="(internal) run as one torchrun rank, write JSON here")
    p.add_argument("--project", action="store_true", help="print the projection of 300-epoch ImageNet runs")
    p.add_argument("--img-s", type=float, default=None, help="measured single-device training img/s (projection)")
    p.add_argument("--img-s-px", type=int, default=224, help="the image size --img-s was measured at")
    p.add_argument("--phases", default=None, help="EPOCHS@PX,...: a recipe's phases (projection; needs --img-s)")
    p.add_argument("--out", type=Path, default=None, help="also write the projection as a results JSON here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="deit_small_distilled")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    if a.project and a.phases:
        if not a.img_s:
            p.error("--phases needs --img-s, the measured single-device img/s at --img-s-px")
        result = project_phases(a.model, parse_phases(a.phases), a.img_s, a.img_s_px)
        print(json.dumps(result, indent=1))
        write_results({"benchmark": "projection", **measured_on(torch.device("cpu")),
                       "command": " ".join(["scaling.py", *(argv if argv is not None else sys.argv[1:])]),
                       "projection": result}, a.out)
        return 0
    if a.project:
        print(json.dumps(project(a.model, a.img_s), indent=1))
        return 0
    p.error("use --project, or run the scaling section through benchmarks/throughput.py --section scaling")
    return 2


if __name__ == "__main__":
    sys.exit(main())
