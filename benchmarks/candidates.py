"""What might lift the training step past today's: each candidate measured against today's
compiled step in one call, with a profile of where today's step spends its time.

A variant is MODEL:BATCH:COMPILE[:ACCUM] (models by size: ti, s, b; COMPILE a torch.compile
mode: default is today's `--compile`, reduce-overhead adds CUDA graphs,
max-autotune-no-cudagraphs autotunes the GEMMs; ACCUM: micro-batches per update, for the
memory it saves). Each row holds the training step's img/s (the run's own Step and
optimizer on random tensors, bf16 autocast on a GPU; median of interleaved repeats), its MFU,
peak memory, and the seconds to its first step apart (compilation, autotuning: Inductor's
cache keeps what it found for the next call on the same machine). The first variant is also
profiled (torch.profiler, a few steps): its top kernels by device time. Before the variants,
the batch tail (normalise, random erasing, mixup/cutmix; `Step.prepare`'s device work) is
timed at `--tail-batch` with the deit recipe's erasing and without it: what erasing's per-pixel
hash costs a step. The JSON is written after every part; `--budget-s` stops starting new
variants, so a call fits its window.

    python benchmarks/candidates.py --device cuda --out benchmarks/results/candidates-nvidia-h200.json
    python benchmarks/candidates.py --device cpu --variants ti:8:none --img-size 32 --depth 2  # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdeit.config.recipes import recipe
from fastdeit.config.schema import with_section
from fastdeit.data.plan import PlanSpec, make_plan
from fastdeit.models.factory import build_model, compile_model, set_attention
from fastdeit.pipelines.tail import apply_tail, tail_inputs
from fastdeit.report.provenance import measured_on, write_results
from fastdeit.runtime.device import amp_dtype, sync, to_device
from fastdeit.training.build import make_optimizer
from fastdeit.training.step import Prepared, make_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import forward_gmacs, peak_flops  # a sibling script, as scaling.py is

MODELS = {"ti": "deit_tiny_distilled", "s": "deit_small_distilled", "b": "deit_base_distilled"}
# The order is the value of what each answers, so a call cut short answers the most.
VARIANTS = "s:256:default,s:512:default,s:256:reduce-overhead,ti:1024:reduce-overhead,ti:1024:default," \
           "s:1024:default,b:512:default,b:1024:default:4,s:256:max-autotune-no-cudagraphs"
CLASSES = 1000


def build(a: argparse.Namespace, name: str, batch: int, mode: str, device: torch.device, accum: int = 1):
    """Today's training Step for one variant (deit recipe, hard distillation), and its inputs."""
    amp = amp_dtype("auto", device)
    cfg = with_section(recipe("deit"), "model", name=name, patch_size=a.patch_size, depth=a.depth, drop_path=0.1)
    cfg = with_section(with_section(cfg, "distill", mode="hard"), "run", accum_steps=accum)
    torch.manual_seed(0)
    model = build_model(cfg.model, CLASSES, a.img_size).to(device)
    gmacs = forward_gmacs(model, a.img_size, device)
    set_attention(model, a.attn)
    compile_model(model, mode)
    step = make_step(cfg, device, amp, CLASSES, model=model, optimizer=make_optimizer(cfg, model, device))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, a.img_size, a.img_size, device=device, generator=g).to(amp or torch.float32)
    soft = torch.softmax(torch.randn(batch, CLASSES, device=device, generator=g), 1)
    hard = torch.randint(0, CLASSES, (batch,), device=device, generator=g)
    return step, Prepared(images=x, soft_labels=soft, teacher=hard, plan=None, bad=()), gmacs


def rate(step, batch: Prepared, steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for k in range(steps):
        step.update(batch, k + 2)
    sync(device)
    return steps * len(batch.images) / (time.perf_counter() - t0)


def measure(a: argparse.Namespace, variant: str, device: torch.device, profile: bool) -> dict[str, Any]:
    size, b, mode, *accum = variant.split(":")
    name, batch = MODELS[size], int(b)
    step, inputs, gmacs = build(a, name, batch, mode, device, int(accum[0]) if accum else 1)
    t0 = time.perf_counter()
    step.update(inputs, 1)  # compilation (and autotuning) happen here
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(a.warmup):
        step.update(inputs, 1)
    rates = [rate(step, inputs, a.steps, device) for _ in range(a.repeats)]
    img_s, peak = float(np.median(rates)), peak_flops(device)
    flops = 3 * 2 * gmacs * 1e9  # forward + backward per image
    row = {"variant": variant, "model": name, "batch": batch, "compile": mode, "accum": step.accum,
           "first_step_s": first,
           "train_img_s": img_s, "train_img_s_spread": [min(rates), max(rates)],
           "mfu": img_s * flops / peak if peak else None,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    if profile:
        row["top_kernels"] = top_kernels(step, inputs, device)
    return row


def top_kernels(step, inputs: Prepared, device: torch.device, steps: int = 3, top: int = 15) -> list[dict]:
    """The kernels (CPU ops without a GPU) that take the most time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step.update(inputs, 1)
        sync(device)
    events = [e for e in prof.key_averages() if (e.self_device_time_total if gpu else e.self_cpu_time_total) > 0]
    key = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1
    return [{"name": e.key[:120], "calls": e.count, "ms_per_step": key(e) / 1e3 / steps, "share": key(e) / total}
            for e in sorted(events, key=key, reverse=True)[:top]]


def tail_cost(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """ms per batch of the tail at the deit recipe (erasing p 0.25, mixup/cutmix), and of the
    same tail with erasing off: their difference is what erasing costs a step."""
    b, s = a.tail_batch, a.img_size
    sizes = np.random.default_rng(0).integers(s, 2 * s, size=(4 * b, 2))
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device)
    labels = torch.randint(0, CLASSES, (b,))
    amp = amp_dtype("auto", device) or torch.float32
    out: dict[str, Any] = {"batch": b, "img_size": s}
    for name, reprob in (("tail_ms", 0.25), ("tail_no_erasing_ms", 0.0)):
        aug = with_section(recipe("deit"), "aug", reprob=reprob, mix_group=min(64, b)).aug
        plan = make_plan(PlanSpec(seed=0, img_size=s, batch_size=b, aug=aug), sizes, 0, 0)
        inputs = to_device(tail_inputs(plan, labels.numpy()), device)
        times = []
        for _ in range(a.warmup + a.steps):
            sync(device)
            t0 = time.perf_counter()
            apply_tail(images, labels, plan, CLASSES, 0.1, amp, inputs)
            sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times[a.warmup:])) * 1e3
        out["erased_rows" if reprob else "rows"] = int((plan.erase[:, 2] > 0).sum()) if reprob else b
    out["erasing_ms"] = out["tail_ms"] - out["tail_no_erasing_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=VARIANTS, help="comma-separated MODEL:BATCH:COMPILE (model ti, s or b)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=0, help="blocks (0: the model's own; for smoke runs)")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=220, help="no variant starts after this many seconds")
    p.add_argument("--tail-batch", type=int, default=256, help="the batch of the tail's timing (DeiT-Ti's)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    device, t0 = torch.device(a.device), time.perf_counter()
    report: dict[str, Any] = {"benchmark": "candidates", **measured_on(device),
                              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                              "settings": {k: v for k, v in vars(a).items() if k != "out"}, "rows": [], "skipped": []}
    report["tail"] = tail_cost(a, device)
    print(f"tail {report['tail']['tail_ms']:.2f} ms a batch, erasing {report['tail']['erasing_ms']:.2f} ms of it",
          file=sys.stderr, flush=True)
    write_results(report, a.out)
    for k, variant in enumerate(a.variants.split(",")):
        if time.perf_counter() - t0 > a.budget_s:
            report["skipped"].append(variant)
            continue
        print(f"{variant} ...", file=sys.stderr, flush=True)
        try:
            report["rows"].append(measure(a, variant, device, profile=k == 0))
        except Exception as e:  # out of memory, a compile failure: recorded, the next variant runs
            report["rows"].append({"variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        torch._dynamo.reset()  # each variant compiles its own model
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        write_results(report, a.out)
    base = report["rows"][0].get("train_img_s") if report["rows"] else None
    for row in report["rows"]:
        if base and "train_img_s" in row:
            row["vs_first"] = row["train_img_s"] / base
        print(f"{row['variant']:40s} " + (f"{row['train_img_s']:9.0f} img/s  first step {row['first_step_s']:.0f} s"
                                          if "train_img_s" in row else row["error"]))
    write_results(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
