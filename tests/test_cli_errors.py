"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing lost."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from fastdeit.cli.commands import app, optional_values

from tiny import TINY_MODEL, TINY_RUN

runner = CliRunner()


def fails(args: list[str], words: str) -> str:
    res = runner.invoke(app, args)
    err = res.stderr.strip()
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and len(err.splitlines()) == 1, err
    assert words in err, err
    return err


def tiny_train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *TINY_RUN, "--data", str(data), "--out", str(out), *extra]


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_real_entry_point_prints_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastdeit.cli.commands", "train", "--data", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "run"), "--model", "deit_tiny"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr
    assert not (tmp_path / "run").exists()


def test_version_through_the_installed_command():
    """`fastdeit --version`, through the console script pip installed (the entry point a user runs)."""
    import fastdeit

    fastdeit_bin = Path(sys.executable).with_name("fastdeit")
    res = subprocess.run([str(fastdeit_bin), "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == f"fastdeit {fastdeit.__version__}\n", res.stderr


def test_missing_and_empty_data(tmp_path):
    fails(tiny_train(tmp_path / "nope", tmp_path / "r", "--model", "deit_tiny"), "does not exist")
    (tmp_path / "empty").mkdir()
    fails(tiny_train(tmp_path / "empty", tmp_path / "r", "--model", "deit_tiny"), "empty/train does not exist")
    (tmp_path / "empty" / "train").mkdir()
    fails(tiny_train(tmp_path / "empty", tmp_path / "r", "--model", "deit_tiny"), "has no class folders")


def test_data_that_is_a_file(tmp_path):
    file = tmp_path / "data.tar"
    file.write_bytes(b"not a folder")
    for args in (tiny_train(file, tmp_path / "r", "--model", "deit_tiny"), ["check-data", str(file)],
                 ["index", str(file)], ["eval", "--data", str(file), "--ckpt", str(file)]):
        assert "does not exist" not in fails(args, "data.tar is a file, not a data folder")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train").write_bytes(b"a file where a folder belongs")
    fails(tiny_train(tmp_path / "d", tmp_path / "r", "--model", "deit_tiny"), "d/train is a file, not a folder")


def test_class_folder_without_images(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path / "d")
    (data / "train" / "zzz").mkdir()
    (data / "train" / "zzz" / "notes.txt").write_text("no images here")
    fails(tiny_train(data, tmp_path / "r", "--model", "deit_tiny"), "zzz has no images")


def test_train_and_val_classes_differ(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path / "d")
    val = sorted((data / "val").iterdir())[0]
    val.rename(val.with_name("other"))
    fails(tiny_train(data, tmp_path / "r", "--model", "deit_tiny"), "train and val class folders differ")


@pytest.mark.parametrize("extra, words", [
    (["--model", "deit_giant"], "unknown model 'deit_giant'"),
    (["--model", "deit_tiny", "--recipe", "imagenet"], "unknown recipe 'imagenet'"),
    (["--model", "deit_tiny", "--set", "optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
    (["--model", "deit_tiny", "--set", "run.batch_size=big"], "run.batch_size must be an integer"),
    (["--model", "deit_tiny", "--batch-size", "15", "--set", "aug.mix_group=15", "--set", "aug.mixup=0.8"],
     "must be even when mixup/cutmix is on"),
    (["--model", "deit_tiny", "--batch-size", "20"], "not a multiple of aug.mix_group 8"),
    (["--model", "deit_tiny_distilled", "--distill", "hard"], "--distill hard needs a teacher"),
    (["--model", "deit_tiny", "--distill", "hard", "--teacher", "resnet10t"],
     "needs a student with a distillation token"),
    (["--model", "deit_tiny", "--batch-size", "128", "--set", "aug.mix_group=8"], "fewer than one global batch"),
    (["--model", "deit_tiny", "--set", "optim.opt=adamq"], "optim.opt 'adamq': Optimizer adamq not found"),
    # a config key is named by the flag the user gave, or by the key given with --set
    (["--model", "deit_tiny", "--distill", "warm"], "--distill must be one of none, soft, hard, got 'warm'"),
    (["--model", "deit_tiny", "--set", "distill.mode=warm"], "distill.mode must be one of none, soft, hard"),
    (["--model", "deit_tiny", "--attn", "fast"], "--attn must be one of auto, sdpa, flex, triton, math"),
    (["--model", "deit_tiny_distilled", "--distill", "hard", "--teacher", "resnet10t", "--targets", "replay"],
     "--targets replay needs --teacher-cache CACHE"),
])
def test_bad_flags(tiny_data, tmp_path, extra, words):
    fails(tiny_train(tiny_data, tmp_path / "r", *extra, *TINY_MODEL), words)
    assert not (tmp_path / "r" / "checkpoint-last.pt").exists()


def test_teacher_with_other_class_count(tiny_data, tmp_path):
    torch.save(timm.create_model("resnet10t", num_classes=7).state_dict(), tmp_path / "t.pth")
    fails(tiny_train(tiny_data, tmp_path / "r", "--model", "deit_tiny_distilled", *TINY_MODEL, "--distill", "hard",
                     "--teacher", "resnet10t", "--teacher-ckpt", str(tmp_path / "t.pth")),
          "teacher predicts 7 classes but the data has 3")


def test_a_teacher_trained_at_another_size_is_one_line(tiny_data, tmp_path):
    """A 64 px DeiT teacher under a 32 px student was a 92-line AssertionError from timm; now one
    line naming --teacher-img-size, with which the run trains."""
    teacher = tmp_path / "teacher"
    res = runner.invoke(app, tiny_train(tiny_data, teacher, "--model", "deit_tiny", *TINY_MODEL, "--img-size", "64"))
    assert res.exit_code == 0, res.output
    student = tiny_train(tiny_data, tmp_path / "s", "--model", "deit_tiny_distilled", *TINY_MODEL, "--distill",
                         "hard", "--teacher-ckpt", str(teacher))
    fails(student, "the teacher takes 64 px images (its weights were trained at 64 px) and would see 32 px ones: "
                   "add --teacher-img-size 64")
    res = runner.invoke(app, [*student, "--teacher-img-size", "64"])
    assert res.exit_code == 0, res.output


def test_a_teacher_named_otherwise_than_its_checkpoint_is_one_line(tiny_data, tmp_path):
    """--teacher must not contradict a fastdeit checkpoint's own model; weights that do not fit
    the --teacher named point at --teacher, not at the student's --model."""
    res = runner.invoke(app, tiny_train(tiny_data, tmp_path / "s", "--model", "deit_tiny", *TINY_MODEL))
    assert res.exit_code == 0, res.output
    student = [*TINY_MODEL, "--model", "deit_tiny_distilled", "--distill", "hard"]
    fails(tiny_train(tiny_data, tmp_path / "r", *student, "--teacher", "resnet10t", "--teacher-ckpt",
                     str(tmp_path / "s")), "is a fastdeit checkpoint of deit_tiny, not resnet10t: drop --teacher")
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "t.pth")
    fails(tiny_train(tiny_data, tmp_path / "r", *student, "--teacher", "resnet18", "--teacher-ckpt",
                     str(tmp_path / "t.pth")), "use the model it was trained as (--teacher)")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu(tiny_data, tmp_path):
    fails(tiny_train(tiny_data, tmp_path / "r", "--model", "deit_tiny", "--device", "cuda"), "no CUDA GPU is visible")


def test_resume_from_another_models_checkpoint(tiny_data, tmp_path):
    res = runner.invoke(app, tiny_train(tiny_data, tmp_path / "a", "--model", "deit_tiny", *TINY_MODEL))
    assert res.exit_code == 0, res.output
    before = (tmp_path / "a" / "checkpoint-last.pt").read_bytes()
    fails(tiny_train(tiny_data, tmp_path / "b", "--model", "deit_tiny_distilled", *TINY_MODEL,
                     "--resume", str(tmp_path / "a" / "checkpoint-last.pt")), "is a checkpoint of deit_tiny")
    fails(tiny_train(tiny_data, tmp_path / "a", "--model", "deit_tiny", *TINY_MODEL, "--seed", "5", "--resume",
                     str(tmp_path / "a" / "checkpoint-last.pt")), "plan differs (seed 0 in the checkpoint, 5 now)")
    fails(tiny_train(tiny_data, tmp_path / "a", "--model", "deit_tiny", *TINY_MODEL),
          "already holds a run (checkpoint-last.pt): continue it with --resume")
    assert (tmp_path / "a" / "checkpoint-last.pt").read_bytes() == before  # nothing lost
    fails(tiny_train(tiny_data, tmp_path / "c", "--model", "deit_tiny", "--resume", str(tmp_path / "none.pt")),
          "no checkpoint at")
    # `--resume` alone on a folder without a checkpoint starts the run (a requeued job's first go).
    res = runner.invoke(app, tiny_train(tiny_data, tmp_path / "d", "--model", "deit_tiny", *TINY_MODEL,
                                        "--resume=auto"))
    assert res.exit_code == 0 and "starting the run" in res.output, res.output


def test_corrupt_jpeg_is_skipped_named_and_counted(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path / "d")
    victim = sorted((data / "train").glob("*/*.jpg"))[4]
    victim.write_bytes(victim.read_bytes()[:200])
    res = runner.invoke(app, tiny_train(data, tmp_path / "r", "--model", "deit_tiny", *TINY_MODEL, "--epochs", "2"))
    assert res.exit_code == 0, res.output
    assert f"skipped unreadable image {victim}" in res.stderr and res.stderr.count(victim.name) == 1
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_files"] for r in lines if r["kind"] == "epoch"] == [1, 1]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["bad_files"] == [
        str(victim.relative_to(data / "train"))]


def test_resume_alone_means_the_run_folders_last_checkpoint():
    assert optional_values(["train", "--resume"]) == ["train", "--resume=auto"]
    assert optional_values(["train", "--resume", "--epochs", "3"]) == ["train", "--resume=auto", "--epochs", "3"]
    assert optional_values(["train", "--resume", "x.pt"]) == ["train", "--resume", "x.pt"]
    assert optional_values(["train", "--compile", "--attn", "math"]) == ["train", "--compile=auto", "--attn", "math"]


@pytest.mark.parametrize("args, words", [
    (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["train", "--accum-steps", "two"], "Invalid value for '--accum-steps'"),
    (["eval", "--data", "d", "--ckpt", "c.pt", "--bogus"], "No such option: --bogus"),
    (["eval", "--data", "d"], "Missing option '--ckpt'"),
    (["eval", "--data", "d", "--ckpt", "c.pt", "--ema=3"], "'--ema' does not take a value"),
    (["train", "--distill"], "'--distill' requires an argument"),
    (["trian"], "No such command 'trian'"),
    (["--bogus", "train"], "No such option: --bogus"),  # before any command
])
def test_a_flag_that_does_not_parse_is_one_line_too(args, words):
    """typer's own errors (a value of the wrong type, an unknown or missing flag) are one line
    naming the command's --help, as docs/cli.md says of every bad input, not a boxed usage."""
    err = fails(args, words)
    see = err.rsplit(" (see ", 1)[-1]  # the command's help where the command is known
    known = args[0] in ("train", "eval")
    assert err.startswith("error: ") and see.endswith(" --help)") and (args[0] in see) == known, err


def test_python_dash_m_fastdeit_is_the_command():
    res = subprocess.run([sys.executable, "-m", "fastdeit", "--version"], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and res.stdout.startswith("fastdeit "), res.stderr


def test_a_cache_gets_a_folder_of_its_own(tiny_data, tmp_path):
    """cache-teacher --out into a run folder mixed its shards among the run's files; into the
    data set, among the images."""
    run = tmp_path / "teacher"
    assert runner.invoke(app, tiny_train(tiny_data, run, "--model", "resnet10t")).exit_code == 0
    cache = ["cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(run), *TINY_RUN[:8]]
    fails([*cache, "--out", str(run)], "is a training run's folder: give the cache a folder of its own")
    fails([*cache, "--out", str(tiny_data / "train" / "cache")], "is inside the data set")


def test_a_huge_value_is_quoted_short(tiny_data, tmp_path):
    """An error line once echoed a value whole, however large."""
    err = fails(tiny_train(tiny_data, tmp_path / "r", "--model", "deit_tiny", "--set", "run.seed=" + "9x" * 50_000),
                "run.seed must be an integer")
    assert len(err) < 300, len(err)
    from fastdeit.errors import UserError

    assert len(str(UserError("x" * 50_000_000))) <= UserError.MAX
