"""The step has one home: training, `cache-teacher --verify` and the throughput benchmark
prepare a batch through the same Step and get the same tensors and the same loss. And the
loop's meter counts training time only."""

import os

import pytest
import timm
import torch
from rich.console import Console

from fastdeit.cli.commands import build_train_config
from fastdeit.config.schema import with_section
from fastdeit.data.loaders import Loaders
from fastdeit.data.plan import PlanSpec
from fastdeit.distill.cache_build import verify_steps
from fastdeit.runtime.distributed import SINGLE
from fastdeit.training.build import build_run, load_data
from fastdeit.training.meter import Meter

from tiny import load_benchmark

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - for the whole module


def test_training_verify_and_the_benchmark_prepare_the_same_batch(tiny_data, tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "teacher.pt")
    # The tiny model and a plan that uses every part of the tail: erasing, mixup and cutmix.
    cfg = build_train_config("demo", {
        "data.path": tiny_data, "model.name": "deit_tiny_distilled", "run.out": tmp_path / "run",
        "sched.epochs": 1, "data.img_size": 32, "run.batch_size": 16, "distill.mode": "hard",
        "distill.teacher": "resnet10t", "distill.teacher_ckpt": tmp_path / "teacher.pt", "run.device": "cpu"},
        ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8", "aug.mix_group=8",
         "aug.mixup=0.8", "aug.cutmix=1.0", "aug.reprob=0.5", "data.workers=0", "run.progress=false"])
    work = tmp_path / "bench"
    work.mkdir()
    bench = load_benchmark("throughput").distill_steps(cfg, work, QUIET)  # builds work/replay and work/labelmap
    replay = with_section(cfg, "distill", targets="replay", teacher_cache=str(work / "replay"))
    training = build_run(replay, SINGLE, QUIET).step
    _, verifying = verify_steps(replay, load_data(cfg).train, work / "replay")

    train_index = load_data(cfg).train
    batch = next(iter(Loaders("torch", cfg.data, PlanSpec.from_config(cfg), torch.device("cpu"))
                      .train(train_index, 0, 0)))
    ours = training.prepare(batch)
    assert (ours.soft_labels.max(1).values < 0.9).any() and ours.teacher.dtype == torch.int64
    for other in (verifying.prepare(batch), bench["replay"].prepare(batch)):
        assert torch.equal(other.images, ours.images) and torch.equal(other.soft_labels, ours.soft_labels)
        assert torch.equal(other.teacher, ours.teacher)
    # the live teacher's labels are the cached ones, on the same device and pipeline
    assert torch.equal(bench["live"].prepare(batch).teacher.argmax(1), ours.teacher)

    bench["replay"].model.load_state_dict(training.model.state_dict())
    theirs = bench["replay"].prepare(batch)
    assert torch.equal(training.update(ours, 1)["loss"], bench["replay"].update(theirs, 1)["loss"])


def _sources(tiny_data, tmp_path):
    """The throughput benchmark's Steps (none, live, replay, labelmap) of a tiny plan that uses
    erasing and mixup/cutmix, and one batch of it."""
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "teacher.pt")
    cfg = build_train_config("demo", {
        "data.path": tiny_data, "model.name": "deit_tiny_distilled", "run.out": tmp_path / "run",
        "sched.epochs": 1, "data.img_size": 32, "run.batch_size": 16, "distill.mode": "hard",
        "distill.teacher": "resnet10t", "distill.teacher_ckpt": tmp_path / "teacher.pt", "run.device": "cpu"},
        ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8", "aug.mix_group=8",
         "aug.mixup=0.8", "aug.cutmix=1.0", "aug.reprob=0.5", "data.workers=0", "run.progress=false"])
    (tmp_path / "bench").mkdir()
    steps = load_benchmark("throughput").distill_steps(cfg, tmp_path / "bench", QUIET)
    batch = next(iter(Loaders("torch", cfg.data, PlanSpec.from_config(cfg), torch.device("cpu"))
                      .train(load_data(cfg).train, 0, 0)))
    return steps, batch


def test_a_step_copies_the_plan_to_the_device_once(tiny_data, tmp_path, monkeypatch):
    """What the tail and the teacher source need of the plan and the cache crosses to the
    device as one buffer: no tensor is made from numpy, nor from Python values, on the way."""
    import fastdeit.training.step

    steps, batch = _sources(tiny_data, tmp_path)
    made, packs = [], []
    real_from_numpy, real_tensor, real_pack = torch.from_numpy, torch.tensor, fastdeit.training.step.to_device
    monkeypatch.setattr(torch, "from_numpy", lambda *a: made.append("from_numpy") or real_from_numpy(*a))
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append("tensor") or real_tensor(*a, **k))
    monkeypatch.setattr(fastdeit.training.step, "to_device", lambda *a: packs.append(1) or real_pack(*a))
    for name, step in steps.items():
        made.clear(), packs.clear()
        step.prepare(batch)
        assert (made, len(packs)) == ([], 1), name


def test_the_live_teacher_runs_as_the_student_does(tiny_data, tmp_path):
    """Frozen, in eval mode, compiled when the student is (and, on CUDA, channels_last with
    cudnn.benchmark), in training and in the distill benchmark alike; caches stay keyed by
    the weights as trained."""
    import dataclasses

    from fastdeit.models.factory import weights_sha256
    from fastdeit.training.rundir import read_weights

    steps, _ = _sources(tiny_data, tmp_path)
    cfg = build_train_config("demo", {
        "data.path": tiny_data, "model.name": "deit_tiny_distilled", "run.out": tmp_path / "run2", "sched.epochs": 1,
        "data.img_size": 32, "run.batch_size": 16, "distill.mode": "hard", "distill.teacher": "resnet10t",
        "distill.teacher_ckpt": tmp_path / "teacher.pt", "run.device": "cpu", "run.compile": "default"},
        ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8", "aug.mix_group=8"])
    benchmark_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=str(tmp_path / "b2")))
    (tmp_path / "b2").mkdir()
    for step in (build_run(cfg, SINGLE, QUIET).step, load_benchmark("throughput").distill_steps(
            benchmark_cfg, tmp_path / "b2", QUIET)["live"]):
        teacher = step.teacher.teacher
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert teacher._compiled_call_impl is not None  # compiled in the student's mode
        assert teacher.fastdeit_sha256 == weights_sha256(read_weights(tmp_path / "teacher.pt")[0])
    assert steps["live"].teacher.teacher._compiled_call_impl is None  # --compile none: eager, as the student


def test_data_wait_is_the_wait_for_the_loader_alone():
    """A logged step's device sync (and the stop vote, hooks) after the step ended was booked as
    waiting for data: on a GPU the data-wait figure would have held the wait for the GPU."""
    now = [0.0]
    meter = Meter(clock=lambda: now[0])
    meter.start_epoch()
    for _ in range(2):
        now[0] += 0.5  # waiting for the loader
        meter.data_ready()
        now[0] += 1.0  # the step
        meter.step_done(10)
        now[0] += 0.5  # logging: .tolist() waits for the device
        meter.asking()
    assert meter.window() == (pytest.approx(20 / 3.5), pytest.approx(1.0 / 3.5))  # up to the last step's end
    assert meter.end_epoch().data_wait == pytest.approx(1.0 / 4.0)


def test_meter_counts_training_time_only():
    now = [0.0]
    meter = Meter(clock=lambda: now[0])
    meter.start_epoch()
    for _ in range(4):
        now[0] += 0.5  # waiting for the loader
        meter.data_ready()
        now[0] += 1.5  # the step
        meter.step_done(10)
    assert meter.window() == (pytest.approx(5.0), pytest.approx(0.25))  # 40 images in 8 s, 2 of them waiting
    with meter.paused():  # a checkpoint: neither training nor waiting
        now[0] += 100.0
    now[0] += 0.5
    meter.data_ready()
    now[0] += 1.5
    meter.step_done(10)
    assert meter.seconds() == pytest.approx(10.0)
    assert meter.window() == (pytest.approx(5.0), pytest.approx(0.25))
    stats = meter.end_epoch()
    assert stats.images == 50 and stats.seconds == pytest.approx(10.0)
    assert stats.train_img_s == pytest.approx(5.0) and stats.data_wait == pytest.approx(0.25)
    assert meter.seconds() == 0.0  # between epochs


@pytest.mark.gpu
def test_the_gpu_step_never_waits_for_the_device(tiny_data, tmp_path):
    """Prepare and update, with each teacher source, under torch.cuda.set_sync_debug_mode('error')."""
    import dataclasses

    steps, batch = _sources(tiny_data, tmp_path)
    gpu = torch.device("cuda")
    batch = dataclasses.replace(batch, images=batch.images.pin_memory(), labels=batch.labels.pin_memory())
    for step in steps.values():
        step = dataclasses.replace(step, device=gpu, amp=torch.bfloat16, model=step.model.to(gpu))
        if step.teacher is not None and hasattr(step.teacher, "teacher"):  # live: under the student's autocast
            step.teacher.teacher.to(gpu)
            step.teacher.amp_dtype = torch.bfloat16
        step.optimizer = torch.optim.AdamW(step.model.parameters(), lr=1e-4, fused=True)
        step.update(step.prepare(batch), 1)  # warm-up: lazy state, cuBLAS handles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step.update(step.prepare(batch), 2)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


@pytest.mark.gpu
def test_on_cuda_the_teacher_runs_channels_last_with_cudnn_benchmark(tiny_data, tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "teacher.pt")
    cfg = build_train_config("demo", {
        "data.path": tiny_data, "model.name": "deit_tiny_distilled", "run.out": tmp_path / "run",
        "data.img_size": 32, "run.batch_size": 16, "distill.mode": "hard", "distill.teacher": "resnet10t",
        "distill.teacher_ckpt": tmp_path / "teacher.pt", "run.device": "cuda"},
        ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8", "aug.mix_group=8"])
    teacher = build_run(cfg, SINGLE, QUIET).step.teacher.teacher
    conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    assert torch.backends.cudnn.benchmark and conv.weight.is_contiguous(memory_format=torch.channels_last)


# max-autotune spends minutes autotuning: last in a GPU window (`-m "gpu and not slow"` leaves it out)
COMPILE_MODES = ["default", "reduce-overhead",
                 pytest.param("max-autotune-no-cudagraphs", marks=pytest.mark.slow)]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_each_compiled_step_candidate_trains_like_the_eager_step(mode):
    """benchmarks/candidates.py's compile modes (CUDA graphs, autotuned GEMMs) are timed only if
    they train as the eager step does: the losses of 4 updates in fp32 (TF32 off), to 1e-4."""
    from fastdeit.config.recipes import recipe
    from fastdeit.config.schema import ModelConfig
    from fastdeit.models.factory import build_model, compile_model
    from fastdeit.training.build import make_optimizer
    from fastdeit.training.step import Prepared, make_step

    gpu, old = torch.device("cuda"), torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = with_section(recipe("deit"), "distill", mode="hard")
    g = torch.Generator(device=gpu).manual_seed(0)
    batches = [Prepared(torch.randn(32, 3, 64, 64, device=gpu, generator=g),
                        torch.softmax(torch.randn(32, 10, device=gpu, generator=g), 1),
                        torch.randint(0, 10, (32,), device=gpu, generator=g), None, ()) for _ in range(4)]
    losses = {}
    try:
        for kind in ("eager", mode):
            torch.manual_seed(0)
            model = build_model(ModelConfig(name="deit_tiny_distilled", depth=4, drop_path=0.0), 10, 64).to(gpu)
            if kind != "eager":
                compile_model(model, mode)
            step = make_step(cfg, gpu, None, 10, model=model, optimizer=make_optimizer(cfg, model, gpu))
            losses[kind] = [float(step.update(b, k + 1)["loss"]) for k, b in enumerate(batches)]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert losses[mode] == pytest.approx(losses["eager"], abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_drop_path_draws_per_update_under_each_mode(mode):
    """With drop path the step reseeds torch's RNG per update (a resumed run draws what an
    uninterrupted one would). Compiled, and replayed as a CUDA graph under reduce-overhead, the
    masks must still follow the seed: two runs give the same losses, and an update given
    another number draws another mask (a mask frozen into the graph would give the same)."""
    from fastdeit.config.recipes import recipe
    from fastdeit.config.schema import ModelConfig
    from fastdeit.models.factory import build_model, compile_model
    from fastdeit.training.build import make_optimizer
    from fastdeit.training.step import Prepared, make_step

    gpu = torch.device("cuda")
    cfg = with_section(recipe("deit"), "distill", mode="hard")
    g = torch.Generator(device=gpu).manual_seed(0)
    batch = Prepared(torch.randn(32, 3, 64, 64, device=gpu, generator=g),
                     torch.softmax(torch.randn(32, 10, device=gpu, generator=g), 1),
                     torch.randint(0, 10, (32,), device=gpu, generator=g), None, ())

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="deit_tiny_distilled", depth=4, drop_path=0.5), 10, 64).to(gpu)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    compile_model(model, mode)  # once: each run below starts from the same weights in place

    def losses(numbers: list[int]) -> list[float]:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(start[k])
        step = make_step(cfg, gpu, None, 10, model=model, optimizer=make_optimizer(cfg, model, gpu))
        assert step.reseed is not None
        return [float(step.update(batch, n)["loss"]) for n in numbers]

    first, again, other = losses([1, 2, 3, 4]), losses([1, 2, 3, 4]), losses([1, 2, 3, 9])
    assert again == first and other[:3] == first[:3]
    assert other[3] != first[3]


@pytest.mark.parametrize("accum", [2, 4])
def test_k_micro_batches_update_like_one_batch(accum):
    """run.accum_steps: the same losses and parameters as one batch, to float32 rounding (the
    gradients are summed in another order), over 3 updates of AdamW with clipping."""
    from fastdeit.config.recipes import recipe
    from fastdeit.config.schema import ModelConfig
    from fastdeit.models.factory import build_model
    from fastdeit.training.build import make_optimizer
    from fastdeit.training.step import Prepared, make_step

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    batches = [Prepared(torch.randn(16, 3, 32, 32, generator=g), torch.softmax(torch.randn(16, 5, generator=g), 1),
                        torch.randint(0, 5, (16,), generator=g), None, ()) for _ in range(3)]
    runs = {}
    for k in (1, accum):
        cfg = with_section(with_section(recipe("deit"), "distill", mode="hard"), "optim", clip_grad=1.0)
        cfg = with_section(cfg, "run", accum_steps=k)
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="deit_tiny_distilled", depth=2, embed_dim=32, num_heads=2, patch_size=8,
                                        drop_path=0.0), 5, 32)
        step = make_step(cfg, cpu, None, 5, model=model, optimizer=make_optimizer(cfg, model, cpu))
        losses = [{n: float(v) for n, v in step.update(b, i + 1).items()} for i, b in enumerate(batches)]
        runs[k] = losses, {n: p.detach().clone() for n, p in model.named_parameters()}, \
            {n: p.grad.clone() for n, p in model.named_parameters()}  # the last update's (AdamW hides a scale)
    (la, pa, ga), (lb, pb, gb) = runs[1], runs[accum]
    for a, b in zip(la, lb):
        assert a.keys() == b.keys() and all(b[n] == pytest.approx(a[n], abs=1e-5) for n in a)
    assert max(float((pa[n] - pb[n]).abs().max()) for n in pa) < 1e-5
    assert all(torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4) for n in ga)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cpu_runs_tail_in_the_loader_workers_gives_the_steps_tensors(tiny_data, tmp_path, workers):
    """On a CPU the torch loader runs the batch tail where it makes the batch (in its worker
    processes with workers > 0, forked as a run forks them): Step.prepare takes that batch as
    it is, and the images, soft labels and teacher targets equal those of the tail run by the
    step on the plain batch, bit for bit (erasing, mixup and cutmix all in the plan)."""
    steps, plain = _sources(tiny_data, tmp_path)
    step = steps["live"]
    cfg = build_train_config("demo", {"data.path": tiny_data, "data.img_size": 32, "run.batch_size": 16,
                                      "run.out": tmp_path / "run"},
                             ["aug.mix_group=8", "aug.mixup=0.8", "aug.cutmix=1.0", "aug.reprob=0.5",
                              f"data.workers={workers}"])
    loaders = Loaders("torch", cfg.data, PlanSpec.from_config(cfg), torch.device("cpu"), tail=step.tail)
    tailed = next(iter(loaders.train(load_data(cfg).train, 0, 0)))
    assert tailed.soft_labels is not None and tailed.images.dtype == torch.float32
    ours, want = step.prepare(tailed), step.prepare(plain)
    assert torch.equal(ours.images, want.images) and torch.equal(ours.soft_labels, want.soft_labels)
    assert torch.equal(ours.teacher, want.teacher)
    gpu = Loaders("torch", cfg.data, PlanSpec.from_config(cfg), torch.device("meta"), tail=step.tail)
    assert gpu.tail is None  # elsewhere the step runs the tail on its device
