"""Throughput of the training step, in images per second, on whatever device is there.

Section `model` (default): for each student, image size, batch size, attention backend and
eager/compiled variant, forward-only and full-training-step img/s (forward, the real
distillation loss, backward, the real optimizer step, in bf16 autocast on a GPU), model FLOP
utilisation against the device's dense bf16 peak (on a CPU: achieved GFLOP/s) and peak
memory (GPU; with --accum-steps K, of the step in K micro-batches); warm-up excluded, median
of interleaved repeats with the spread.

Section `attention` (GPU): forward + backward time of each attention backend (our Triton
kernel, and SDPA with each of its kernels forced) on the shapes of DeiT-Ti/S/B.

Section `distill`: the same student, batch and device trained with --distill none, and with
hard distillation whose targets come from the live teacher, a replay cache and label maps.
Batches are decoded once beforehand, so the table shows what the target source costs the
step (the tail, the targets, forward, loss, backward and the optimizer step are timed).

    python benchmarks/throughput.py --quick       # a minute on a CPU: the smoke run
    python benchmarks/throughput.py --device cpu
    python benchmarks/throughput.py --device cuda --models deit_tiny_distilled,deit_small_distilled,\
        deit_base_distilled --img-size 224 --batch-sizes 256,512 --attn sdpa,triton --compile none,auto
    python benchmarks/throughput.py --device cuda --models deit_base_distilled --batch-sizes 1024 \
        --compile auto --accum-steps 1,4,8          # peak memory with and without accumulation
    python benchmarks/throughput.py --section attention --device cuda
    python benchmarks/throughput.py --section distill --device cpu
    python benchmarks/throughput.py --section distill --device cuda --student deit_small_distilled \\
        --teacher regnety_160 --img-size 224 --batch-size 256
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from rich.console import Console
from tables import print_distill, print_model, print_scaling  # a sibling script, as scaling.py is
from torch.utils.flop_counter import FlopCounterMode

from fastdeit.config.recipes import recipe
from fastdeit.config.schema import TeacherTargets, TrainConfig, apply_overrides, choices, with_section
from fastdeit.data.loaders import Loaders
from fastdeit.data.plan import PlanSpec
from fastdeit.data.synthetic import SyntheticSet, is_complete, write_synthetic
from fastdeit.distill.cache_build import build_labelmap, build_replay
from fastdeit.models.factory import build_model
from fastdeit.report.provenance import measured_on, write_results
from fastdeit.runtime.atomic import atomic_save
from fastdeit.runtime.device import amp_dtype, sync
from fastdeit.runtime.distributed import SINGLE
from fastdeit.training.build import Data, load_data, make_optimizer, open_teacher
from fastdeit.training.step import Prepared, Step, make_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charts import chart  # a sibling script's module


def forward_gmacs(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Multiply-accumulates of one image's forward pass, attention included: SDPA is counted
    through its math path, since the flop counter knows the GPU kernels of SDPA but not the
    CPU's fused one, and left the attention matmuls out on a CPU (4% of DeiT-B at 224 px)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        model(torch.zeros(1, 3, size, size, device=device))
    model.train(was)
    return counter.get_total_flops() / 2 / 1e9


def distill_config(a: argparse.Namespace, device: torch.device, data: Path, work: Path) -> TrainConfig:
    """The deit recipe at the benchmark's size and batch, hard distillation from a teacher of
    random weights saved in `work` (speed does not depend on the weights)."""
    classes = len(load_data(with_section(recipe("deit"), "data", path=str(data))).classes)
    torch.manual_seed(0)
    atomic_save(timm.create_model(a.teacher, num_classes=classes).state_dict(), work / "teacher.pt")
    cfg = apply_overrides(recipe("deit"), [f"aug.mix_group={min(64, a.batch_size)}", "aug.repeated_aug=1",
                                           "data.workers=0", f"data.eval_batch_size={a.batch_size}", "sched.epochs=1"])
    cfg = with_section(cfg, "data", path=str(data), img_size=a.img_size)
    cfg = with_section(cfg, "run", batch_size=a.batch_size, device=device.type, out=str(work / "run"))
    cfg = with_section(cfg, "model", name=a.student, drop_path=0.0)
    return with_section(cfg, "distill", mode="hard", teacher=a.teacher, teacher_ckpt=str(work / "teacher.pt"))


def distill_steps(cfg: TrainConfig, work: Path, console: Console) -> dict[str, Step]:
    """The training Step of `cfg` with each teacher source: none, the live teacher, a replay
    cache and label maps (both built into `work` first, for epoch 0), opened and assembled
    exactly as a training run does it (build.open_teacher, step.make_step). They share one
    student; each has its own optimizer."""
    data = load_data(cfg)
    device = torch.device(cfg.run.device)
    amp = amp_dtype(cfg.run.amp, device)
    build_replay(cfg, data.train, work / "replay", 1, console)
    build_labelmap(cfg, data.train, work / "labelmap", console)
    torch.manual_seed(cfg.run.seed)
    student = build_model(cfg.model, len(data.classes), cfg.data.img_size).to(device)
    steps = {}
    for name in ("none", *choices(TeacherTargets)):
        run = with_section(cfg, "distill", mode="none") if name == "none" else with_section(
            cfg, "distill", targets=name, teacher_cache=str(work / name) if name != "live" else "")
        source, _why = open_teacher(run, data, student, SINGLE, device, amp, console)
        steps[name] = make_step(run, device, amp, len(data.classes), source, model=student,
                                optimizer=make_optimizer(run, student, device))
    return steps


def distill_section(a: argparse.Namespace, device: torch.device, console: Console) -> dict:
    data = a.data or Path(tempfile.gettempdir()) / f"fastdeit-bench-distill-{a.img_size}"
    if a.data is None:
        synthetic = SyntheticSet(classes=10, train_per_class=max(1, a.batch_size * (a.steps + a.warmup) // 10) + 1,
                                 val_per_class=1, min_size=a.img_size, max_size=int(a.img_size * 1.5))
        if not is_complete(data, synthetic):
            write_synthetic(data, synthetic)
    work = Path(tempfile.mkdtemp(prefix="fastdeit-bench-"))
    cfg = distill_config(a, device, data, work)
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    steps = distill_steps(cfg, work, quiet)
    batches = first_batches(cfg, load_data(cfg), device, a.warmup + a.steps)
    student = steps["none"].model
    live = steps["live"].teacher.teacher
    macs = {"student": forward_gmacs(student, a.img_size, device), "teacher": forward_gmacs(live, a.img_size, device)}
    state = {k: v.clone() for k, v in student.state_dict().items()}
    runs: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(a.repeats):  # rounds interleave the sources, so drifts hit them alike
        for name, step in steps.items():
            student.load_state_dict(state)
            step = dataclasses.replace(step, optimizer=make_optimizer(cfg, student, device))  # fresh moments
            console.print(f"round {r + 1}/{a.repeats}: {name} ...")
            for k, batch in enumerate(batches):
                if k == a.warmup:
                    sync(device)
                    t0 = time.perf_counter()
                step(batch, k + 1)
            sync(device)
            runs[name].append(a.steps * a.batch_size / (time.perf_counter() - t0))
    rates = {k: float(np.median(v)) for k, v in runs.items()}
    return {"student": a.student, "teacher": a.teacher, "img_size": a.img_size, "batch_size": a.batch_size,
            "forward_gmacs": macs, "teacher_to_student_forward": macs["teacher"] / macs["student"],
            "img_per_s": rates, "img_per_s_runs": runs,
            "step_cost_vs_none": {k: rates["none"] / v - 1.0 for k, v in rates.items() if k != "none"}}


def first_batches(cfg: TrainConfig, data: Data, device: torch.device, n: int) -> list:
    """The first `n` batches of epoch 0, decoded once beforehand (the torch reference loader)."""
    batches = []
    for batch in Loaders("torch", cfg.data, PlanSpec.from_config(cfg), device).train(data.train, 0, 0):
        batches.append(batch)
        if len(batches) == n:
            return batches
    raise SystemExit(f"the data set holds {len(batches)} batches, {n} are needed")


# Dense bf16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets.
PEAKS = {"H200": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "H100": 989.4e12, "A100": 312e12,
         "L40S": 362.1e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def _median_rate(fn, images: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return steps * images / (time.perf_counter() - t0)


def model_section(a: argparse.Namespace, device: torch.device, console: Console, rows: list[dict],
                  save: Callable[[], None]) -> list[dict]:
    """Each variant's row is appended to `rows` and saved at once: a run cut short keeps what it measured."""
    sizes = [int(v) for v in a.img_sizes.split(",")] if a.img_sizes else [a.img_size]
    variants = [(m, px, b, at, c, k) for m in a.models.split(",") for px in sizes
                for b in map(int, a.batch_sizes.split(",")) for at in a.attn.split(",")
                for c in a.compile.split(",") for k in map(int, a.accum_steps.split(","))]
    for name, px, batch, attn, comp, accum in variants:
        console.print(f"model: {name} {px} px batch {batch} attn {attn} compile {comp} accum {accum} ...")
        try:
            rows.append(measure_student(a, name, batch, attn, comp, device, accum, px))
        except Exception as e:  # e.g. out of memory at this batch: recorded, not fatal
            console.print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            rows.append({"model": name, "img_size": px, "batch": batch, "attn": attn, "compile": comp,
                         "accum": accum, "error": str(e)[:300]})
        save()
    return rows


def measure_student(a: argparse.Namespace, name: str, batch: int, attn: str, comp: str,
                    device: torch.device, accum: int = 1, size: int | None = None) -> dict:
    """Forward-only and training-step img/s of one student variant at `size` px (default
    --img-size), with FLOPs and memory: the training step is the run's own Step (make_step,
    make_optimizer) on random inputs, in `accum` micro-batches (peak memory with and without
    gradient accumulation); with hard distillation where the student has a distillation
    token (DeiT III's have none)."""
    from fastdeit.models.factory import compile_model, set_attention

    amp, classes, peak = amp_dtype("auto", device), 1000, peak_flops(device)
    size = size or a.img_size
    cfg = with_section(recipe("deit"), "model", name=name, patch_size=a.patch_size, drop_path=0.1, depth=a.depth)
    cfg = with_section(cfg, "distill", mode="hard" if "distilled" in name else "none")
    cfg = with_section(cfg, "run", accum_steps=accum)
    torch.manual_seed(0)
    model = build_model(cfg.model, classes, size).to(device)
    gmacs = forward_gmacs(model, size, device)
    set_attention(model, attn)
    mode = compile_model(model, comp)
    step = make_step(cfg, device, amp, classes, model=model, optimizer=make_optimizer(cfg, model, device))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device, generator=g).to(amp or torch.float32)
    y = torch.softmax(torch.randn(batch, classes, device=device, generator=g), 1)
    t = torch.randint(0, classes, (batch,), device=device, generator=g)
    prepared = Prepared(images=x, soft_labels=y, teacher=t, plan=None, bad=())

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            model(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.eval()
    fwd = [_median_rate(forward, batch, a.steps, a.warmup, device) for _ in range(a.repeats)]
    rates = [_median_rate(lambda: step.update(prepared, 1), batch, a.steps, a.warmup, device)
             for _ in range(a.repeats)]
    train_flops = 3 * 2 * gmacs * 1e9  # forward + backward (twice the forward) per image
    rate = float(np.median(rates))
    return {"model": name, "img_size": size, "batch": batch, "attn": attn, "compile": mode, "accum": accum,
            "forward_gmacs": gmacs, "forward_img_s": float(np.median(fwd)),
            "forward_img_s_spread": [min(fwd), max(fwd)],
            "train_img_s": rate, "train_img_s_spread": [min(rates), max(rates)],
            "train_tflop_s": rate * train_flops / 1e12, "mfu": rate * train_flops / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def attention_section(a: argparse.Namespace, device: torch.device, console: Console, rows: list[dict],
                      save: Callable[[], None]) -> list[dict]:
    """Forward + backward of one attention layer per backend, bf16, on DeiT-Ti/S/B shapes."""
    from torch.nn.attention import SDPBackend

    from fastdeit.kernels import attention as A

    if device.type != "cuda":
        console.print("attention: needs a CUDA device, skipped")
        return rows
    side = a.img_size // a.patch_size
    n = side * side + 2  # patches + class and distillation tokens: 198 at 224 px
    candidates = [("triton", A.triton_attention), ("sdpa (default)", A.sdpa_attention),
                  ("sdpa flash", partial(_sdpa_with, SDPBackend.FLASH_ATTENTION)),
                  ("sdpa cudnn", partial(_sdpa_with, SDPBackend.CUDNN_ATTENTION)),
                  ("sdpa efficient", partial(_sdpa_with, SDPBackend.EFFICIENT_ATTENTION))]
    for name, heads in (("deit_tiny", 3), ("deit_small", 6), ("deit_base", 12)):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(a.attn_batch, heads, n, 64, device=device, dtype=torch.bfloat16, generator=g)
                   .requires_grad_(True) for _ in range(3))
        flop = A.flops(a.attn_batch, heads, n, 64, backward=True)
        for label, fn in candidates:
            console.print(f"attention: {name} {label} ...")
            try:
                ms = A._time_fwd_bwd(fn, q, k, v, repeats=a.steps * 4)
            except Exception as e:  # a kernel that does not take this shape or dtype
                rows.append({"shape": name, "tokens": n, "backend": label, "error": str(e)[:200]})
                save()
                continue
            rows.append({"shape": name, "tokens": n, "heads": heads, "head_dim": 64, "batch": a.attn_batch,
                         "backend": label, "ms_fwd_bwd": ms, "tflop_s": flop / ms / 1e9})
            save()
    return rows


def _sdpa_with(backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _scaling():
    """benchmarks/scaling.py, loaded by path: it is also the script torchrun starts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastdeit_bench_scaling", Path(__file__).with_name("scaling.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", default="model", choices=["model", "attention", "distill", "scaling"])
    p.add_argument("--procs", default="1,2", help="scaling: comma-separated process (GPU) counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--img-size", type=int, default=None, help="default: 224 on a GPU, 112 on a CPU")
    p.add_argument("--img-sizes", default=None, help="comma-separated (model section; default: --img-size)")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=0, help="model section: blocks (0: the model's own; for smoke runs)")
    p.add_argument("--models", default=None, help="comma-separated students (model section)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (model section)")
    p.add_argument("--attn", default="sdpa", help="comma-separated backends (model section)")
    p.add_argument("--compile", default="none,auto", help="comma-separated: none, auto or a torch.compile mode")
    p.add_argument("--accum-steps", default="1", help="comma-separated micro-batches per update (model section)")
    p.add_argument("--attn-batch", type=int, default=256, help="batch of the attention section")
    p.add_argument("--data", type=Path, default=None, help="distill: ImageFolder root (default: synthetic)")
    p.add_argument("--student", default="deit_tiny_distilled", help="distill section")
    # On a CPU: resnet50 at 112 px costs 3.9x the forward of DeiT-tiny at 112 px, about what
    # RegNetY-16GF costs DeiT-S at 224 (3.75x).
    p.add_argument("--teacher", default="resnet50", help="distill section")
    p.add_argument("--batch-size", type=int, default=32, help="distill section")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="the median of these is reported, with the spread")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats: a smoke run of about a minute")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.repeats = 2, 1, 2
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    a.img_size = a.img_size or (224 if gpu else 112)
    a.models = a.models or ("deit_tiny_distilled,deit_small_distilled,deit_base_distilled" if gpu
                            else "deit_tiny_distilled")
    a.batch_sizes = a.batch_sizes or ("256" if gpu else "16")
    if a.threads:
        torch.set_num_threads(a.threads)
    console = Console(stderr=True)
    report = {"benchmark": "throughput", "section": a.section, **measured_on(device),
              "settings": {"steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "img_size": a.img_size,
                           **({"depth": a.depth} if a.depth else {}),
                           "threads": torch.get_num_threads(), "peak_flops": peak_flops(device)},
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    def save() -> None:
        write_results(report, a.out)

    if a.section == "model":
        model_section(a, device, console, report.setdefault("model", []), save)
        print_model(report["model"], f"training step, {a.img_sizes or a.img_size} px, {report['device']}", gpu)
    elif a.section == "attention":
        attention_section(a, device, console, report.setdefault("attention", []), save)
        for r in report["attention"]:
            console.print(r)
    elif a.section == "scaling":
        report["scaling"] = _scaling().scaling_section(a, device, console)
        print_scaling(report["scaling"], f"data-parallel scaling, {a.img_size} px, {report['device']}")
    else:
        report["distill"] = result = distill_section(a, device, console)
        print_distill(result, f"distillation targets: {a.student} <- {a.teacher} "
                               f"({result['teacher_to_student_forward']:.2f}x its forward), {a.img_size} px, "
                               f"batch {a.batch_size}, {report['device']}")
    write_results(report, a.out)
    if a.out:
        console.print(f"wrote {a.out} and {chart(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
