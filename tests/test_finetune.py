"""Fine-tuning at a higher resolution with a teacher at its own resolution, and transfer to a
data set with another class count, with frozen parts."""

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.config.recipes import recipe
from fastdeit.data.synthetic import SyntheticSet, write_synthetic

from tiny import TINY_MODEL, TINY_RUN

runner = CliRunner()


def ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.stdout


def losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "step"]


def test_the_recipes_carry_the_official_values():
    ft, tr = recipe("deit-finetune-384"), recipe("transfer")
    assert (ft.data.img_size, ft.optim.lr, ft.optim.base_batch, ft.optim.weight_decay, ft.sched.epochs,
            ft.sched.min_lr, ft.sched.warmup_epochs, ft.sched.warmup_lr) == (384, 5e-6, 512, 1e-8, 30, 5e-6, 5, 1e-6)
    assert (tr.optim.opt, tr.optim.lr, tr.optim.base_batch, tr.optim.weight_decay, tr.sched.epochs,
            tr.aug.reprob, tr.model.drop_path) == ("sgd", 0.01, 768, 1e-4, 1000, 0.0, 0.0)


def test_fine_tuning_at_a_higher_resolution_with_the_teacher_at_its_own(tiny_data, tmp_path):
    """A 32 px student and teacher; the student fine-tuned at 64 px (position embeddings
    resampled), distilled from the teacher seeing 32 px views, live (the teacher given as its
    run folder) and from a replay cache keyed on that size (built from the checkpoint file)."""
    teacher = tmp_path / "teacher"
    ok(["train", *TINY_RUN, "--data", str(tiny_data), "--model", "resnet10t", "--out", str(teacher)])
    base = tmp_path / "base"
    ok(["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny_distilled",
        "--out", str(base)])
    fine = [*TINY_RUN, *TINY_MODEL, "--recipe", "deit-finetune-384", "--img-size", "64", "--batch-size", "16",
            "--epochs", "1", "--set", "aug.mix_group=8", "--set", "sched.warmup_epochs=0", "--data", str(tiny_data),
            "--model", "deit_tiny_distilled",
            "--set", f"model.init={base / 'checkpoint-last.pt'}", "--distill", "hard",
            "--teacher-ckpt", str(teacher / "checkpoint-last.pt"), "--teacher-img-size", "32",
            "--set", "run.log_every=1"]
    live = [str(teacher) if a == str(teacher / "checkpoint-last.pt") else a for a in fine]  # a run folder: its best
    ok(["train", *live, "--out", str(tmp_path / "live")])
    sd = torch.load(tmp_path / "live" / "checkpoint-last.pt", weights_only=True)["model"]
    assert sd["pos_embed"].shape[1] == 2 + 64  # (64 / 8)^2 patches + class and distillation tokens
    cache = tmp_path / "cache"
    plan = ["--recipe", "deit-finetune-384", "--img-size", "64", "--batch-size", "16", "--epochs", "1",
            "--set", "aug.mix_group=8", "--set", "data.workers=0", "--set", "sched.warmup_epochs=0"]
    ok(["cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(teacher / "checkpoint-last.pt"),
        "--out", str(cache), "--teacher-img-size", "32", *plan])
    ok(["train", *fine, "--out", str(tmp_path / "replay"), "--targets", "replay", "--teacher-cache", str(cache)])
    assert losses(tmp_path / "live") == losses(tmp_path / "replay")  # the cache holds the 32 px teacher's labels
    res = runner.invoke(app, ["train", *fine[:-2], "--teacher-img-size", "64", "--out", str(tmp_path / "r2"),
                              "--targets", "replay", "--teacher-cache", str(cache), "--set", "run.log_every=1"])
    assert res.exit_code == 2 and "teacher img size" in res.stderr, res.output


def test_transfer_to_other_classes_with_frozen_parts(tiny_data, tmp_path):
    other = tmp_path / "other"
    write_synthetic(other, SyntheticSet(classes=2, train_per_class=16, val_per_class=4, seed=11))
    base = tmp_path / "base"
    ok(["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny", "--out", str(base)])
    start = torch.load(base / "checkpoint-last.pt", weights_only=True)["model"]
    for only in ("head", "attn"):
        run = tmp_path / only
        ok(["train", *TINY_RUN, *TINY_MODEL, "--recipe", "transfer", "--batch-size", "16", "--epochs", "1",
            "--set", "aug.mix_group=8", "--set", "aug.repeated_aug=1", "--set", "sched.warmup_epochs=0",
            "--data", str(other), "--model", "deit_tiny",
            "--out", str(run), "--set", f"model.init={base if only == 'attn' else base / 'checkpoint-last.pt'}",
            "--train-only", only])  # a run folder or its checkpoint
        sd = torch.load(run / "checkpoint-last.pt", weights_only=True)["model"]
        assert sd["head.weight"].shape[0] == 2  # a new head for the new classes
        assert torch.equal(sd["blocks.0.mlp.fc1.weight"], start["blocks.0.mlp.fc1.weight"])  # frozen
        assert torch.equal(sd["patch_embed.proj.weight"], start["patch_embed.proj.weight"])
        moved = not torch.equal(sd["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
        assert moved == (only == "attn")


def test_vit_family_students_build_at_any_size_or_say_why():
    from fastdeit.config.schema import ModelConfig
    from fastdeit.errors import ConfigError
    from fastdeit.models.factory import build_model

    for name, patch, tokens in (("deit3_small_patch16_224", 8, 64), ("vit_small_patch32_224", 16, 1 + 4)):
        model = build_model(ModelConfig(name=name, patch_size=patch, depth=1), 3, 64)
        assert model.pos_embed.shape[1] == tokens and model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    try:
        build_model(ModelConfig(name="deit3_small_patch16_224", depth=1), 3, 60)
        raise AssertionError("60 px with 16 px patches built")
    except ConfigError as e:
        assert "patch size 16" in str(e)
