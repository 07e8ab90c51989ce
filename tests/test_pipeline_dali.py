"""DALI pipelines against the torch reference, on the CPU (the same graph runs on the GPU)."""

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdeit.config.schema import AugConfig
from fastdeit.data.folder import scan_split
from fastdeit.data.plan import RA_OPS, RA_OPS_INC, PlanSpec, level_to_arg
from fastdeit.pipelines import dali
from fastdeit.pipelines.reference import eval_loader, load_plan_rows, rand_augment_op

pytestmark = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed")
CPU = torch.device("cpu")


def spec(batch=24, size=48, **aug) -> PlanSpec:
    base = dict(mix_group=8, repeated_aug=1)
    return PlanSpec(seed=3, img_size=size, batch_size=batch, aug=replace(AugConfig(), **{**base, **aug}))


def per_sample_mad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).abs().mean(dim=(1, 2, 3))


def first_batches(index, s, n, start=0, epoch=0, world=1, rank=0, device=CPU):
    loader = dali.DaliTrainLoader(index, s, device, threads=2, rank=rank, world=world)
    out = []
    for batch in loader.epoch(epoch, start):
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_geometry_matches_the_reference(tiny_data):
    """Crop, resize and flip only. Both decode with libjpeg-turbo and resize with an
    antialiased bicubic filter: a 1/255 mean difference per sample bounds what we see (0.3)."""
    index = scan_split(tiny_data, "train")
    s = spec(rand_augment="")
    for batch in first_batches(index, s, 3):
        ref = load_plan_rows(index, s, batch.plan)
        assert torch.equal(batch.labels, ref.labels)
        assert per_sample_mad(batch.images, ref.images).max() < 1.0


def marker_tree(root: Path) -> list[tuple[int, int]]:
    rng = np.random.default_rng(0)
    marks = []
    for c in ("a", "b"):
        for split in ("train", "val"):
            (root / split / c).mkdir(parents=True)
        for i in range(16):
            w, h = int(rng.integers(120, 200)), int(rng.integers(120, 200))
            mx, my = int(rng.integers(40, w - 40)), int(rng.integers(40, h - 40))
            a = np.full((h, w, 3), 40, np.uint8)
            a[my - 2:my + 3, mx - 2:mx + 3] = 255
            Image.fromarray(a).save(root / "train" / c / f"{i:02d}.jpg", quality=98)
            marks.append((mx, my))
        Image.fromarray(np.full((100, 100, 3), 90, np.uint8)).save(root / "val" / c / "0.jpg")
    return marks


def test_flips_and_crops_agree_on_a_marker(tmp_path):
    marks = marker_tree(tmp_path)
    index = scan_split(tmp_path, "train")
    s = spec(batch=32, size=64, rand_augment="", scale=(0.3, 1.0), mixup=0.0, cutmix=0.0)
    (batch,) = first_batches(index, s, 1)
    ref = load_plan_rows(index, s, batch.plan).images.float().mean(1)
    ours = batch.images.float().mean(1)
    checked = 0
    for i in range(len(batch.plan)):
        left, top, w, h = batch.plan.crop[i]
        mx, my = marks[batch.plan.index[i]]
        if not (left + 3 <= mx < left + w - 3 and top + 3 <= my < top + h - 3):
            continue
        peak = np.unravel_index(int(ours[i].argmax()), (64, 64))
        peak_ref = np.unravel_index(int(ref[i].argmax()), (64, 64))
        assert abs(peak[0] - peak_ref[0]) <= 1 and abs(peak[1] - peak_ref[1]) <= 1
        checked += 1
    assert checked >= 16 and batch.plan.flip.any() and (~batch.plan.flip).any()


# What each op may differ by, in grey levels: the LUT and blend ops match PIL to within one
# level of rounding; the geometric ops interpolate bilinearly (DALI's warp_affine has no
# bicubic) where PIL is bicubic; Equalize follows OpenCV's lookup table, not PIL's, which
# differs most on images of few flat colours like these (about 12 levels on average here).
EXACT = {"AutoContrast", "Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing",
         "SolarizeAdd", "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness",
         "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing"}
BOUND = {"Equalize": 16.0, "Rotate": 4.0, "ShearX": 4.0, "ShearY": 4.0, "TranslateXRel": 4.0, "TranslateYRel": 4.0}


def apply_alone(images: list[np.ndarray], names, op: int, arg: float, size: int) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def

    from fastdeit.pipelines.dali.augment import apply_layer, layer_params

    kind, mat, scalar = layer_params(names, np.full(len(images), op), np.full(len(images), arg), size)

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, enable_conditionals=True)
    def graph():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        k, m, s = fn.external_source(source=lambda: (kind, mat, scalar), num_outputs=3, batch=True)
        return apply_layer(x, k, m, s, "cpu", size)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[i]) for i in range(len(images))]


@pytest.mark.parametrize("increasing", [True, False])
def test_each_rand_augment_op_matches_the_reference(tiny_data, increasing):
    files = sorted((tiny_data / "train").glob("*/*.jpg"))[::9]
    size = 48
    images = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for f in files]
    names = RA_OPS_INC if increasing else RA_OPS
    for op, name in enumerate(names):
        for mag, negate in ((3.0, False), (9.0, True), (9.7, False)):
            arg = float(level_to_arg(op, np.array([mag]), np.array([negate]), increasing)[0])
            ours = apply_alone(images, names, op, arg, size)
            for img, out in zip(images, ours):
                ref = np.asarray(rand_augment_op(Image.fromarray(img), name, arg)).astype(int)
                diff = np.abs(out.astype(int) - ref)
                if name in EXACT:
                    assert diff.max() <= 1 and diff.mean() < 0.05, (name, mag, diff.max(), diff.mean())
                else:
                    assert diff.mean() < BOUND[name], (name, mag, diff.mean())


def test_full_recipe_batches_stay_close(tiny_data):
    """The DeiT recipe's RandAugment (m9, two layers) on top: batch mean within 2 levels."""
    index = scan_split(tiny_data, "train")
    s = spec()
    for batch in first_batches(index, s, 2):
        ref = load_plan_rows(index, s, batch.plan)
        assert per_sample_mad(batch.images, ref.images).mean() < 2.0


def test_same_plan_same_output_and_resume(tiny_data):
    index = scan_split(tiny_data, "train")
    s = spec()
    a = first_batches(index, s, 3, epoch=1)
    b = first_batches(index, s, 3, epoch=1)
    resumed = first_batches(index, s, 1, start=2, epoch=1)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and x.plan.step == y.plan.step
    assert resumed[0].plan.step == 2 and torch.equal(resumed[0].images, a[2].images)
    # the same loader over two epochs (pipeline reset between them)
    loader = dali.DaliTrainLoader(index, s, CPU, threads=2)
    first = [b.images for b in loader.epoch(1, 0)]
    again = [b.images for b in loader.epoch(1, 0)]
    assert len(first) == 72 // 24 and all(torch.equal(x, y) for x, y in zip(first, again))


def test_two_ranks_cover_the_global_batch(tiny_data):
    index = scan_split(tiny_data, "train")
    s = spec(mix_group=4)
    (whole,) = first_batches(index, s, 1)
    parts = [first_batches(index, s, 1, world=2, rank=r)[0] for r in (0, 1)]
    assert [len(p.labels) for p in parts] == [12, 12]
    assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
    assert np.array_equal(np.concatenate([p.plan.index for p in parts]), whole.plan.index)


def test_unreadable_files_are_skipped_and_reported(tiny_data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    files = sorted((root / "train").glob("*/*.jpg"))
    garbage, truncated = files[2], files[7]
    garbage.write_bytes(b"not an image")  # header unreadable: skipped from the index on
    truncated.write_bytes(truncated.read_bytes()[:300])  # found only when DALI fails on it
    index = scan_split(root, "train")
    s = spec(batch=72, rand_augment="")
    (batch,) = first_batches(index, s, 1)
    names = {str(garbage.relative_to(root / "train")), str(truncated.relative_to(root / "train"))}
    assert set(batch.bad) == names
    ref = load_plan_rows(index, s, batch.plan)
    assert set(ref.bad) == names and torch.equal(batch.labels, ref.labels)
    assert per_sample_mad(batch.images, ref.images).max() < 1.0  # substituted rows agree too


def test_eval_matches_the_reference(tiny_data):
    index = scan_split(tiny_data, "val")
    ours = list(dali.dali_eval_batches(index, 40, 0.875, 8, CPU, 2))
    ref = list(eval_loader(index, 40, 0.875, 8, 0))
    assert len(ours) == len(ref) == 3  # 18 images: batches of 8, 8, 2
    for (x, y, ok), (rx, ry, _rok) in zip(ours, ref):
        assert torch.equal(y, ry) and ok.all() and x.shape == rx.shape
        assert per_sample_mad(x, rx).max() < 1.0



@pytest.mark.gpu
def test_gpu_eval_matches_the_reference(tiny_data):
    """Evaluation with the mixed decoder on the GPU (the end of a real run's first epoch) gives
    the reference's labels and images, on the GPU, up to nvJPEG's differences."""
    index = scan_split(tiny_data, "val")
    ours = list(dali.dali_eval_batches(index, 40, 0.875, 8, torch.device("cuda"), 2))
    ref = list(eval_loader(index, 40, 0.875, 8, 0))
    assert len(ours) == len(ref) == 3
    for (x, y, ok), (rx, ry, _rok) in zip(ours, ref):
        assert x.is_cuda and torch.equal(y.cpu(), ry) and ok.all() and x.shape == rx.shape
        assert per_sample_mad(x.cpu(), rx).mean() < 3.0

@pytest.mark.gpu
def test_gpu_graph_matches_the_cpu_graph(tiny_data):
    index = scan_split(tiny_data, "train")
    s = spec()
    cpu = first_batches(index, s, 2)
    gpu_loader = dali.DaliTrainLoader(index, s, torch.device("cuda"), threads=2)
    for c, g in zip(cpu, gpu_loader.epoch(0, 0)):
        assert g.images.is_cuda and g.plan.step == c.plan.step
        # nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling
        assert per_sample_mad(g.images.cpu(), c.images).mean() < 3.0


def test_full_decoding_then_crop_matches_roi_decoding(tiny_data):
    index = scan_split(tiny_data, "train")
    s = spec(rand_augment="")
    roi = first_batches(index, s, 1)[0]
    full = next(dali.DaliTrainLoader(index, s, CPU, threads=2, roi_decode=False).epoch(0, 0))
    assert per_sample_mad(roi.images, full.images).max() < 0.5


def test_a_new_epoch_after_a_partial_one_yields_only_its_own_batches(tiny_data):
    """Batches prefetched for an abandoned position never come out of a later epoch() call."""
    index = scan_split(tiny_data, "train")
    s = spec(rand_augment="")
    loader = dali.DaliTrainLoader(index, s, CPU, threads=2)
    partial = loader.epoch(0, 0)
    next(partial)  # one batch taken, more in flight
    for epoch, start in ((1, 0), (0, 1)):
        got = list(loader.epoch(epoch, start))
        want = first_batches(index, s, 3 - start, start=start, epoch=epoch)
        assert [(b.plan.epoch, b.plan.step) for b in got] == [(epoch, k) for k in range(start, 3)]
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    with pytest.raises(RuntimeError, match="another epoch"):
        next(partial)  # an iterator of an earlier epoch() call is finished, not silently wrong


def test_one_pipeline_serves_the_run(tiny_data, tmp_path, monkeypatch):
    """Epoch after epoch, the same pipeline and the same reader processes (a rebuild costs new
    readers, the index pickled again and the decoder set up: seconds per epoch on a GPU run),
    giving the batches of a fresh pipeline per epoch; a resume mid-epoch gets a fresh one; with
    the run's length known, nothing past it is planned or read."""
    import os

    index, s = scan_split(tiny_data, "train"), spec(rand_augment="")
    fresh = [[b.images for b in dali.DaliTrainLoader(index, s, CPU, threads=2).epoch(e)] for e in range(3)]
    real = dali.PlanSource.__call__
    log = tmp_path / "calls"

    def logged(self, info):
        out = real(self, info)  # a position past the run raises StopIteration: not logged
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {self.position(info.iteration)[0]}\n")
        return out

    monkeypatch.setattr(dali.PlanSource, "__call__", logged)  # forked readers inherit it
    loader = dali.DaliTrainLoader(index, s, CPU, threads=2, readers=2, epochs=3)
    for e in range(3):
        got = [b.images for b in loader.epoch(e)]
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(fresh[e], got, strict=True))
    assert loader.builds == 1
    calls = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for pid, _ in calls}) <= 2 and str(os.getpid()) not in {pid for pid, _ in calls}
    assert max(int(e) for _, e in calls) == 2  # epoch 3 is past the run: never planned
    resumed = [b.images for b in loader.epoch(1, 1)]
    assert loader.builds == 2 and all(torch.equal(a, b) for a, b in zip(fresh[1][1:], resumed, strict=True))


@pytest.mark.gpu
def test_gpu_batches_do_not_depend_on_the_world_size(tiny_data):
    """With the default decoder options (no nvJPEG hardware share), a rank's shard decodes to
    the very pixels of the same rows of the one-process batch."""
    index, s, gpu = scan_split(tiny_data, "train"), spec(rand_augment=""), torch.device("cuda")
    whole = first_batches(index, s, 1, device=gpu)[0]
    shards = [first_batches(index, s, 1, world=3, rank=r, device=gpu)[0] for r in range(3)]
    assert torch.equal(torch.cat([b.images for b in shards]), whole.images)


def test_plans_and_file_reads_run_in_reader_processes(tiny_data, tmp_path, monkeypatch):
    """With read workers the external source runs in DALI's worker processes, off the training
    thread; the batches are those of in-thread reading."""
    import os

    index, s = scan_split(tiny_data, "train"), spec(rand_augment="")
    real = dali.PlanSource.__call__
    log = tmp_path / "pids"

    def logged(self, info):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(self, info)

    monkeypatch.setattr(dali.PlanSource, "__call__", logged)  # forked readers inherit it
    inline = [b.images for b in dali.DaliTrainLoader(index, s, CPU, threads=2, readers=0).epoch(0)]
    assert set(log.read_text().split()) == {str(os.getpid())}
    log.unlink()
    parallel = [b.images for b in dali.DaliTrainLoader(index, s, CPU, threads=2, readers=2).epoch(0)]
    assert str(os.getpid()) not in log.read_text().split()
    assert len(parallel) == len(inline) == 3 and all(torch.equal(a, b) for a, b in zip(inline, parallel))


def test_readers_are_spawned_once_the_cuda_driver_is_up(tiny_data, monkeypatch):
    """DALI refuses to fork readers once the CUDA driver is initialised (its own check), which
    `torch.cuda.is_available()` does without setting `torch.cuda.is_initialized()`: the choice
    followed torch's flag, so a GPU run that had asked is_available() stopped at its first
    epoch. Here the driver is reported up, as on a GPU: the readers are spawned (the index and
    the plan source pickled, fastdeit imported afresh in each), and they give the batches of
    in-thread reading, from any step (a resume)."""
    from nvidia.dali import backend

    index, s = scan_split(tiny_data, "train"), spec(rand_augment="rand-m9-mstd0.5-inc1")
    inline = [b.images for b in dali.DaliTrainLoader(index, s, CPU, threads=2, readers=0).epoch(0)]
    monkeypatch.setattr(backend, "IsDriverInitialized", lambda: True)
    assert dali.reader_start_method() == "spawn"
    spawned = dali.DaliTrainLoader(index, s, CPU, threads=2, readers=2)
    got = [b.images for b in spawned.epoch(0)]
    assert len(got) == len(inline) == 3 and all(torch.equal(a, b) for a, b in zip(inline, got))
    resumed = [b.images for b in spawned.epoch(0, 1)]
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(inline[1:], resumed))


@pytest.mark.gpu
def test_gpu_readers_start_after_cuda_is_up(tiny_data):
    """On a GPU, after torch has used CUDA (as a run has, building its model), the readers of a
    DALI GPU graph start (spawned) and give the batches of in-thread reading."""
    gpu = torch.device("cuda")
    torch.zeros(1, device=gpu)  # the driver and a context are up
    index, s = scan_split(tiny_data, "train"), spec(rand_augment="")
    assert dali.reader_start_method() == "spawn"
    inline = [b.images for b in dali.DaliTrainLoader(index, s, gpu, threads=2, readers=0).epoch(0)]
    spawned = [b.images for b in dali.DaliTrainLoader(index, s, gpu, threads=2, readers=2).epoch(0)]
    assert len(spawned) == len(inline) == 3 and all(torch.equal(a, b) for a, b in zip(inline, spawned))
