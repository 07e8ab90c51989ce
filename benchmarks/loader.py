"""Images per second of the full train pipeline: plan -> augmented, normalized batch on the device.

Runs the DeiT recipe (RandAugment m9, random resized crop, flip, erasing, mixup/cutmix) through
fastdeit's DALI pipeline, its torch reference pipeline, and the official DeiT pipeline as the
baseline (timm's create_transform + a torch DataLoader + timm's Mixup, with the same number of
workers), and prints a table and writes JSON.

    python benchmarks/loader.py --make-data 2000 --device cpu --workers 2
    python benchmarks/loader.py --make-data 2000 --loader dali,torch --prepared 256,512   # + prepared copies
    python benchmarks/loader.py --data /path/to/imagenet --device cuda --workers 16 --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ImageFilter, ImageOps
from rich.console import Console
from rich.table import Table

from fastdeit.config.recipes import recipe
from fastdeit.config.schema import IMAGENET_MEAN, IMAGENET_STD, TrainConfig, with_section
from fastdeit.data.folder import ImageIndex, load_dataset
from fastdeit.data.loaders import Loaders
from fastdeit.data.plan import PlanSpec
from fastdeit.data.preparing import PrepareOptions, prepare_data
from fastdeit.data.synthetic import SyntheticSet, is_complete, write_synthetic
from fastdeit.pipelines import dali
from fastdeit.report.provenance import measured_on, write_results
from fastdeit.runtime.device import amp_dtype, sync
from fastdeit.training.step import make_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charts import chart  # a sibling script's module

THREE = ", 3-Augment"  # the suffix of a result measured with DeiT III's 3-Augment


def recipe_config(data: Path, img_size: int, batch: int, device: torch.device, augment: str = "rand") -> TrainConfig:
    """The deit recipe (RandAugment m9, mixup/cutmix, erasing) at the benchmark's size and
    batch; augment "three": DeiT III's 3-Augment in RandAugment's place, no erasing, no
    smoothing (its recipe's values)."""
    cfg = with_section(recipe("deit"), "aug", repeated_aug=1, mix_group=min(64, batch))
    if augment == "three":
        cfg = with_section(cfg, "aug", rand_augment="", three_augment=True, color_jitter=0.3, reprob=0.0,
                           smoothing=0.0)
    cfg = with_section(cfg, "data", path=str(data), img_size=img_size)
    return with_section(cfg, "run", batch_size=batch, device=device.type)


def _solarize(img):
    return ImageOps.solarize(img)


def _blur(img):
    return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def official_three_augment(img_size: int):
    """The official augment.py's 3-Augment transform (RandomResizedCrop, flip, one of
    grayscale / solarize / blur, ColorJitter(0.3, 0.3, 0.3), normalise), from the same calls."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms

    return transforms.Compose([
        RandomResizedCropAndInterpolation(img_size, scale=(0.08, 1.0), interpolation="bicubic"),
        transforms.RandomHorizontalFlip(),
        transforms.RandomChoice([transforms.Grayscale(3), transforms.Lambda(_solarize), transforms.Lambda(_blur)]),
        transforms.ColorJitter(0.3, 0.3, 0.3),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


@dataclass
class Rate:
    """One loader's measurement: img/s in steady state, inside one epoch, and what starting
    an epoch costs (from asking for it to its first batch: workers, pipeline, first decodes)."""

    img_s: float
    epoch_start_s: float


def timed_rate(epoch: Iterable, consume: Callable[[Any], int], warmup: int, steps: int,
               device: torch.device) -> Rate:
    """Images per second over `steps` batches of ONE epoch, in steady state: the clock starts
    after `warmup` batches (callers pass at least the loader's prefetch depth + 1, so the
    batches decoded before the clock started are used up first). An epoch's start (new reader
    processes or workers, a new pipeline) is timed apart, never inside the window. An epoch
    shorter than warmup + steps batches is an error, never a figure."""
    timed = images = 0
    t0 = 0.0
    asked = time.perf_counter()
    start_s = None
    for k, batch in enumerate(epoch):
        if start_s is None:
            sync(device)
            start_s = time.perf_counter() - asked
        if k == warmup:
            sync(device)
            t0 = time.perf_counter()
        count = consume(batch)
        if k >= warmup:
            timed, images = timed + 1, images + count
        if timed == steps:
            break
    if timed < steps:
        raise SystemExit(f"an epoch gave {warmup + timed} batches, {warmup + steps} are needed in one epoch: use "
                         f"more data (--make-data) or fewer --steps")
    sync(device)
    return Rate(images / (time.perf_counter() - t0), start_s or 0.0)


def warmup_for(kind: str, workers: int, warmup: int) -> int:
    """At least the loader's prefetch depth + 1: DALI's queue (2), DataLoader's prefetch_factor
    (4 in fastdeit's torch loader, 2 in the official one) per worker."""
    depth = {"baseline": 2 * max(workers, 1)}.get(kind, 2 if kind.startswith("dali") else 4 * max(workers, 1))
    return max(warmup, depth + 1)


def fastdeit_rate(kind: str, cfg: TrainConfig, index: ImageIndex, device: torch.device, workers: int, steps: int,
                  warmup: int) -> Rate:
    """kind: torch, dali (region-of-interest decoding), dali-full (whole image, then crop),
    dali-hw (as dali, with nvJPEG's hardware decoder taking its share: A100/H100 class GPUs) or
    dali-inline (as dali, with the plan and the file reads in the training thread instead of
    cfg.data.read_workers processes). Each batch is prepared by the run's Step (device
    transfer and the tail, which a CPU run's torch loader runs in its workers), as training
    does."""
    data = replace(cfg.data, workers=workers, roi_decode=kind != "dali-full", hw_decode=kind == "dali-hw",
                   read_workers=0 if kind == "dali-inline" else cfg.data.read_workers)
    step = make_step(cfg, device, amp_dtype(cfg.run.amp, device), len(index.classes))
    # As a run builds them: on a CPU the torch loader's workers run the tail too.
    loaders = Loaders("dali" if kind.startswith("dali") else kind, data, PlanSpec.from_config(cfg), device,
                      tail=step.tail)
    return timed_rate(loaders.train(index, 0, 0), lambda b: len(step.prepare(b).soft_labels),
                      warmup_for(kind, workers, warmup), steps, device)


def _posterize_zero_bits_is_black() -> None:
    """timm asks PIL to keep 0 bits at RandAugment magnitude 10, which Pillow >= 12 refuses
    (ValueError), ending the official pipeline within a few batches; older Pillow gave black."""
    from timm.data import auto_augment as aa

    original = aa.posterize

    def posterize(img, bits_to_keep, **kwargs):
        return img.point(lambda _: 0) if bits_to_keep <= 0 else original(img, bits_to_keep, **kwargs)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        aa.NAME_TO_OP[name] = posterize


def baseline_rate(root: Path, img_size: int, batch: int, device: torch.device, workers: int, steps: int,
                  warmup: int, num_classes: int, augment: str = "rand") -> Rate:
    """The official DeiT data path: timm transforms in DataLoader workers, Mixup on the device
    (augment "three": the official DeiT III 3-Augment transform)."""
    from timm.data import Mixup, create_transform
    from torchvision.datasets import ImageFolder

    _posterize_zero_bits_is_black()
    transform = official_three_augment(img_size) if augment == "three" else create_transform(
        img_size, is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
        re_prob=0.25, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    data = ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.0 if augment == "three" else 0.1, num_classes=num_classes)

    def consume(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        _, y = mixup(batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))
        return len(y)

    return timed_rate(loader, consume, warmup_for("baseline", workers, warmup), steps, device)


class StageClock:
    """Seconds per stage: each call ends the stage it names (from the previous call's end)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        self.at = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.at
        self.at = now


def twice_the_output(cfg: TrainConfig, index: ImageIndex) -> float:
    """The share of epoch 0's crops at least twice the output on both sides: the images whose
    decode JPEG's DCT scaling (PIL's `draft`) could halve without decoding below the crop's
    resolution. The plan's own crops, on the data set measured."""
    from fastdeit.data.plan import make_plan, steps_per_epoch

    spec = PlanSpec.from_config(cfg)
    crops = np.concatenate([make_plan(spec, index.sizes, 0, k).crop for k in range(steps_per_epoch(spec, len(index)))])
    return float(((crops[:, 2] >= 2 * spec.img_size) & (crops[:, 3] >= 2 * spec.img_size)).mean())


def profile_reference(cfg: TrainConfig, index: ImageIndex, images: int) -> dict[str, float]:
    """Where the reference pipeline's time goes, in ms per image on one thread: the first
    `images` rows of epoch 0's plans read, decoded, through `augment` (its own stage marks)
    and to an array as the loader does each, then the batch tail (which a CPU run's loader
    workers run) per image of a batch."""
    from fastdeit.data.plan import make_plan
    from fastdeit.pipelines import reference as ref
    from fastdeit.pipelines.tail import apply_tail

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = PlanSpec.from_config(cfg)
    plan = make_plan(spec, index.sizes, 0, 0)
    clock = StageClock()
    rows = [i % len(plan) for i in range(images)]
    for i in rows:
        clock.start()
        source = index.open(plan.index[i])
        clock("read")
        img = ref.decode(source)
        clock("decode")
        np.asarray(ref.augment_row(img, spec, plan, i, mark=clock))
        clock("to array")
    seconds = clock.seconds
    out = {name: v * 1e3 / len(rows) for name, v in seconds.items()}
    batch = ref.load_plan_rows(index, spec, plan)
    apply_tail(batch.images, batch.labels, plan, len(index.classes), cfg.aug.smoothing)  # warm
    t0 = time.perf_counter()
    apply_tail(batch.images, batch.labels, plan, len(index.classes), cfg.aug.smoothing)
    out["the batch tail"] = (time.perf_counter() - t0) * 1e3 / len(plan)
    torch.set_num_threads(threads)
    return out


def make_data(n: int, root: Path | None) -> Path:
    """N ImageNet-sized synthetic JPEGs (375-500 px, quality 90) in 10 classes, written once."""
    synthetic = SyntheticSet(classes=10, train_per_class=max(1, n // 10), val_per_class=1, min_size=375, max_size=500)
    root = root or Path(os.environ.get("TMPDIR", "/tmp")) / f"fastdeit-bench-{n}"
    if not is_complete(root, synthetic):
        write_synthetic(root, synthetic)
    return root


def prepared_variants(data: Path, sides: list[int], where: Path, console: Console) -> dict[str, ImageIndex]:
    """The train split of `data` prepared at each longest side (`fastdeit prepare-data`, made
    once in `where`), keyed by the name its results take."""
    out = {}
    for side in sides:
        folder = where / f"{data.resolve().name}-prepared-{side}"
        console.print(f"preparing {data} at max side {side} in {folder} ...")
        prepare_data(data, folder, PrepareOptions(max_side=side))
        out[f"prepared {side}px"] = load_dataset(folder)[0]
    return out


def _base(name: str) -> str:
    """The official pipeline a result compares with: the one of its augmentation."""
    return "baseline" + (THREE if name.endswith(THREE) else "")


def print_table(report: dict, title: str) -> None:
    results, runs = report["img_per_s"], report["img_per_s_runs"]
    table = Table(title=title)
    table.add_column("loader")
    table.add_column("img/s (median)", justify="right")
    table.add_column("min-max", justify="right")
    table.add_column("vs baseline", justify="right")
    table.add_column("epoch start s", justify="right")
    for k, v in results.items():
        ratio = report["ratios"].get(f"{k}/{_base(k)}")
        start = report["epoch_start_s"].get(k)
        table.add_row(k, f"{v:.0f}", f"{min(runs[k]):.0f}-{max(runs[k]):.0f}", "" if ratio is None else f"{ratio:.2f}x",
                      "" if start is None else f"{start:.2f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="ImageFolder root (train/ is read)")
    p.add_argument("--make-data", type=int, default=0, metavar="N",
                   help="write N ImageNet-sized synthetic JPEGs (375-500 px, quality 90) and use them")
    p.add_argument("--loader", default="dali,dali-inline,dali-full,torch,baseline",
                   help="comma-separated: dali (ROI decoding), dali-inline (its reads in the training thread), "
                        "dali-full (full decoding + crop), dali-hw (nvJPEG's hardware share on), torch, baseline")
    p.add_argument("--read-workers", type=int, default=2, help="DALI: processes that plan batches and read files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds over all loaders; the median is reported")
    p.add_argument("--prepared", default="", metavar="SIDES",
                   help="also measure the fastdeit loaders on the data prepared at these max sides (e.g. 256,512)")
    p.add_argument("--prepared-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")),
                   help="where the prepared copies are made (once)")
    p.add_argument("--augment", default="rand", help="comma-separated: rand (the deit recipe's RandAugment), "
                                                     "three (DeiT III's 3-Augment), each against its official twin")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also time the reference pipeline's stages on N images, one thread (ms per image)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.make_data:
        a.data = make_data(a.make_data, a.data)
    if a.data is None:
        p.error("pass --data DIR or --make-data N")
    index = load_dataset(a.data)[0]  # a tree or a prepared data set
    group = min(64, a.batch_size)
    if a.batch_size % group:
        p.error(f"--batch-size must be a multiple of {group} (the mix group)")
    augments = a.augment.split(",")
    if not set(augments) <= {"rand", "three"}:
        p.error(f"--augment takes rand and/or three, got {a.augment}")
    cfgs = {aug: recipe_config(a.data, a.img_size, a.batch_size, device, aug) for aug in augments}
    cfgs = {aug: replace(c, data=replace(c.data, read_workers=a.read_workers)) for aug, c in cfgs.items()}
    console = Console(stderr=True)
    kinds = [k for k in a.loader.split(",") if dali.available() or not k.startswith("dali")]
    if len(kinds) < len(a.loader.split(",")):
        console.print("dali: not installed, skipped")
    if index.store is not None and "baseline" in kinds:
        console.print("baseline: reads ImageFolder trees, not prepared data sets; skipped")
        kinds.remove("baseline")
    variants = {"": index, **prepared_variants(a.data, [int(v) for v in a.prepared.split(",") if v],
                                                   a.prepared_dir, console)}
    cases = [(k, v, aug) for aug in augments for k in kinds for v in variants
             if k != "baseline" or not v]  # the baseline reads the tree
    runs: dict[str, list[float]] = {(f"{k}, {v}" if v else k) + (THREE if aug == "three" else ""): []
                                    for k, v, aug in cases}
    starts: dict[str, list[float]] = {name: [] for name in runs}  # each epoch's start, timed apart
    need = max(warmup_for(k, a.workers, a.warmup) for k in kinds) + a.steps
    if len(index) // a.batch_size < need:
        p.error(f"one epoch is {len(index) // a.batch_size} batches; the timed window needs {need} in one epoch "
                f"(the largest warm-up + --steps): use --make-data {need * a.batch_size} or more")
    def make_report() -> dict:
        results = {k: float(np.median(v)) for k, v in runs.items() if v}
        return {
            "benchmark": "loader", **measured_on(device),
            "settings": {"batch_size": a.batch_size, "img_size": a.img_size, "workers": a.workers,
                         "read_workers": a.read_workers, "steps": a.steps,
                         "warmup": a.warmup, "warmup_rule": "at least the loader's prefetch depth + 1",
                         "window": "inside one epoch; an epoch's start (workers, pipeline) is epoch_start_s",
                         "repeats": a.repeats, "images": len(index),
                         "prepared": {v: {"max_side": int(v.split()[1][:-2]), "mean_bytes": float(ix.nbytes.mean())}
                                      for v, ix in variants.items() if v} or None,
                         "source_mean_bytes": float(index.nbytes.mean()),
                         "data": "synthetic 375-500 px" if a.make_data else "user data",
                         "recipe": "deit (RandAugment m9, mixup/cutmix, erasing); names ending in "
                                   f"'{THREE}': DeiT III's 3-Augment (no erasing, no smoothing)"},
            "img_per_s": results,
            "img_per_s_runs": runs,
            "epoch_start_s": {k: float(np.median(v)) for k, v in starts.items() if v},
            "ratios": {f"{k}/{_base(k)}": v / results[_base(k)] for k, v in results.items()
                       if not k.startswith("baseline") and _base(k) in results},
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        }

    for r in range(a.repeats):  # rounds interleave the loaders, so drifts hit them alike
        for (kind, variant, aug), name in zip(cases, runs):
            console.print(f"round {r + 1}/{a.repeats}: {name} ...")
            if kind == "baseline":
                rate = baseline_rate(a.data, a.img_size, a.batch_size, device, a.workers, a.steps, a.warmup,
                                     len(index.classes), aug)
            else:
                rate = fastdeit_rate(kind, cfgs[aug], variants[variant], device, a.workers, a.steps, a.warmup)
            runs[name].append(rate.img_s)
            starts[name].append(rate.epoch_start_s)
            write_results(make_report(), a.out)  # a call cut short keeps what it measured
    report = make_report()
    if a.profile:
        report["reference_profile_ms_per_image"] = profile = profile_reference(cfgs[augments[0]], index, a.profile)
        report["crops_at_least_twice_the_output"] = scalable = twice_the_output(cfgs[augments[0]], index)
        console.print("reference pipeline, ms per image on one thread: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in profile.items()))
        console.print(f"crops at least twice the output on both sides (JPEG's DCT scaling could decode them "
                      f"at half size): {100 * scalable:.2f}% of epoch 0's")
    print_table(report, f"train pipeline, {report['device']}, {a.img_size} px, batch {a.batch_size}, "
                        f"{a.workers} workers")
    write_results(report, a.out)
    if a.out:
        console.print(f"wrote {a.out} and {chart(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
