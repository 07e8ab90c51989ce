"""End to end through the CLI on a tiny data set: run folder, eval, distillation, resume."""

import json
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fastdeit
from fastdeit.cli.commands import app
from fastdeit.training.step import Step

from tiny import TINY_MODEL, TINY_RUN

runner = CliRunner()


def train(*args: str) -> dict:
    res = runner.invoke(app, ["train", *TINY_RUN, *args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads(res.stdout.strip().splitlines()[-1])


def records(run: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


@pytest.fixture(scope="module")
def teacher_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    train("--data", str(tiny_data), "--model", "resnet10t", "--out", str(out), "--epochs", "2")
    return out


def test_run_folder_layout(teacher_run):
    names = {p.name for p in teacher_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint-last.pt", "checkpoint-best.pt", "summary.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    cfg = json.loads((teacher_run / "config.json").read_text())
    assert cfg["model"]["name"] == "resnet10t" and cfg["sched"]["epochs"] == 2
    assert cfg["provenance"]["fastdeit"] == fastdeit.__version__ and cfg["provenance"]["loader"].startswith("torch")
    summary = json.loads((teacher_run / "summary.json").read_text())
    for key in ("top1", "top5", "train_img_s", "wall_s", "git_commit", "eval_img_s"):
        assert key in summary
    assert summary["fastdeit"] == fastdeit.__version__
    steps = records(teacher_run, "step")
    assert steps and all({"epoch", "step", "loss", "lr", "img_s", "data_wait"} <= set(r) for r in steps)
    epochs = records(teacher_run, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1] and all("top1" in e for e in epochs)


def test_eval_command_reproduces_the_runs_numbers(teacher_run, tiny_data):
    res = runner.invoke(app, ["eval", "--data", str(tiny_data), "--ckpt", str(teacher_run / "checkpoint-last.pt"),
                              "--workers", "0"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    summary = json.loads((teacher_run / "summary.json").read_text())
    assert got["top1"] == pytest.approx(summary["top1"]) and got["top5"] == pytest.approx(summary["top5"])
    assert got["images"] == 18


def test_hard_distillation_from_a_trained_teacher(teacher_run, tiny_data, tmp_path):
    out = tmp_path / "student"
    train("--data", str(tiny_data), "--model", "deit_tiny_distilled", "--out", str(out), *TINY_MODEL,
          "--distill", "hard", "--teacher-ckpt", str(teacher_run / "checkpoint-last.pt"))
    summary = json.loads((out / "summary.json").read_text())
    assert {"top1_cls", "top1_dist", "top1"} <= set(summary)
    step = records(out, "step")[0]
    assert {"loss_base", "loss_distill"} <= set(step)
    assert step["loss"] == pytest.approx(0.5 * step["loss_base"] + 0.5 * step["loss_distill"], rel=1e-5)
    res = runner.invoke(app, ["eval", "--data", str(tiny_data), "--ckpt", str(out / "checkpoint-last.pt"),
                              "--head", "dist", "--workers", "0"])
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[-1])["top1"] == pytest.approx(summary["top1_dist"])


# Stop at the last step of epoch 0 (4 steps an epoch), and mid-epoch 1 with loader processes;
# by Ctrl-C, or by SIGTERM as a scheduler preempting the job sends it.
@pytest.mark.parametrize("stop_at, workers, sig", [(4, 0, signal.SIGINT), (6, 2, signal.SIGTERM)])
def test_resume_gives_the_same_losses_as_a_straight_run(tiny_data, tmp_path, monkeypatch, stop_at, workers, sig):
    common = ["--data", str(tiny_data), "--model", "deit_tiny_distilled", *TINY_MODEL, "--epochs", "2",
              "--set", f"data.workers={workers}",
              "--set", "run.log_every=1", "--set", "model.drop_path=0.1", "--set", "aug.mixup=0.8",
              "--set", "aug.cutmix=1.0", "--set", "aug.reprob=0.25", "--set", "model.ema=true",
              "--set", "aug.rand_augment=rand-m9-mstd0.5-inc1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(*common, "--out", str(straight))

    # The same run, interrupted by Ctrl-C during its step number `stop_at`...
    calls = {"n": 0}
    real_update = Step.update

    def update(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == stop_at:
            signal.raise_signal(sig)
        return real_update(self, *a, **k)

    monkeypatch.setattr(Step, "update", update)
    res = runner.invoke(app, ["train", *TINY_RUN, *common, "--out", str(split)])
    assert res.exit_code == 3 and "continue with --resume" in res.output  # stopped on request, saved
    monkeypatch.setattr(Step, "update", real_update)
    # ...then resumed: it continues the same plan stream from the same step.
    train(*common, "--out", str(split), "--resume", str(split / "checkpoint-last.pt"))
    a = {(r["epoch"], r["step"]): r["loss"] for r in records(straight, "step")}
    b = {(r["epoch"], r["step"]): r["loss"] for r in records(split, "step")}
    assert len(a) == 8 and a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]) <= 1e-6, key
    resumed = records(split, "resume")
    assert [(r["epoch"], r["step"]) for r in resumed] == [((stop_at - 1) // 4, (stop_at - 1) % 4 + 1)]
    ea, eb = records(straight, "epoch")[-1], records(split, "epoch")[-1]
    assert ea["top1"] == eb["top1"] and ea["top1_ema"] == eb["top1_ema"]


def test_the_official_per_epoch_schedule_is_timms_stepped_as_main_py_steps_it(tiny_data, tmp_path):
    """sched.update=epoch: every update of epoch e runs at the lr the official loop uses in
    epoch e (timm's CosineLRScheduler, built per epoch, `lr_scheduler.step(epoch)` after each
    epoch). A resume sets it with the same call (`step_update(updates)`)."""
    import torch
    from timm.scheduler import CosineLRScheduler

    out, sets = tmp_path / "run", ["--set", "sched.update=epoch", "--set", "sched.warmup_epochs=2",
                                   "--set", "run.log_every=1", "--set", "sched.min_lr=1e-6"]
    train(*TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny", "--out", str(out), "--epochs", "5", *sets)
    cfg = json.loads((out / "config.json").read_text())
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg["optim"]["lr"] * 16 / 512)
    official = CosineLRScheduler(opt, t_initial=5, lr_min=1e-6, warmup_lr_init=cfg["sched"]["warmup_lr"],
                                 warmup_t=2)
    per_epoch = []
    for epoch in range(6):  # main.py: train_one_epoch(...), then lr_scheduler.step(epoch); a 6th: after the end
        per_epoch.append(opt.param_groups[0]["lr"])
        official.step(epoch)
    steps = records(out, "step")
    assert {s["epoch"] for s in steps} == set(range(5)) and len(set(per_epoch)) >= 4
    for s in steps:  # a step record's lr is the one the next update uses: the same epoch except at its end
        epoch = s["updates"] // 4
        assert s["lr"] == pytest.approx(per_epoch[epoch], rel=1e-9), s


def test_lamb_trains_and_an_apex_optimizer_without_apex_is_one_line(tiny_data, tmp_path):
    """optim.opt=lamb (timm's LAMB, as DeiT III uses) trains; fusedlamb goes to apex through
    timm's factory where apex is installed, and is one line naming it and the built-in
    replacement where it is not (apex is not on PyPI, so never required)."""
    summary = train(*TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny", "--out", str(tmp_path / "lamb"),
                    "--set", "optim.opt=lamb")
    assert summary["top1"] is not None
    try:  # with apex, timm's factory takes over: nothing to refuse
        import apex  # noqa: F401
        pytest.skip("apex is installed here")
    except ImportError:
        pass
    res = runner.invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny",
                              "--out", str(tmp_path / "fused"), "--set", "optim.opt=fusedlamb"])
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and "apex" in line and "optim.opt=lamb" in line, res.output


def test_a_resume_names_a_changed_accumulation(tiny_data, tmp_path):
    out = tmp_path / "run"
    train("--data", str(tiny_data), "--model", "deit_tiny", *TINY_MODEL, "--out", str(out))
    res = runner.invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny",
                              "--out", str(out), "--epochs", "2", "--accum-steps", "2", "--resume=auto"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stderr.splitlines() if x.startswith("resuming with a changed schedule"))
    assert "run.accum_steps 1 -> 2" in line and "sched.epochs 1 -> 2" in line, line


def test_bce_trains_and_refuses_smoothing_that_would_make_every_class_a_positive(tiny_data, tmp_path):
    """distill.base_loss=bce: the first logged loss is a binary cross-entropy (about ln 2 per
    class at initialisation; the cross-entropy over 3 classes starts near ln 3), and with label
    smoothing on, every target would be > 0: one line, before anything runs."""
    base = [*TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny", "--set", "run.log_every=1"]
    train(*base, "--out", str(tmp_path / "bce"), "--set", "distill.base_loss=bce", "--set", "aug.smoothing=0")
    train(*base, "--out", str(tmp_path / "ce"), "--set", "aug.smoothing=0")
    first = {k: records(tmp_path / k, "step")[0]["loss"] for k in ("bce", "ce")}
    assert abs(first["bce"] - 0.693) < 0.15 and abs(first["ce"] - 1.099) < 0.3, first
    res = runner.invoke(app, ["train", *TINY_RUN, *base, "--out", str(tmp_path / "no"), "--set",
                              "distill.base_loss=bce", "--set", "aug.smoothing=0.1"])
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and "distill.base_loss" in line and "aug.smoothing=0" in line, res.output
    assert not (tmp_path / "no").exists()


def test_deit3_students_train_without_a_teacher_and_say_why_not_with_one(tiny_data, tmp_path):
    """deit3_small (timm's LayerScale ViT, DeiT III's student) by its short name trains; with a
    teacher, one line says it has no distillation token, as the official DeiT III has none."""
    from timm.models.vision_transformer import VisionTransformer

    from fastdeit.config.schema import ModelConfig
    from fastdeit.models.factory import build_model

    model = build_model(ModelConfig(name="deit3_small", depth=2, embed_dim=32, num_heads=2, patch_size=8), 3, 32)
    assert type(model) is VisionTransformer and model.blocks[0].ls1.gamma.shape == (32,)  # LayerScale
    base = [*TINY_MODEL, "--data", str(tiny_data), "--model", "deit3_small"]
    assert train(*base, "--out", str(tmp_path / "none"))["top1"] is not None
    res = runner.invoke(app, ["train", *TINY_RUN, *base, "--out", str(tmp_path / "hard"), "--distill", "hard",
                              "--teacher", "resnet10t"])
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and "DeiT III" in line and "--distill none" in line, res.output
