"""Faults and bad inputs that must not lose work, lie, or end in a traceback: corrupt files,
corrupt checkpoints, corrupt caches, a diverging run, a full disk. Each case states what is
kept and what the user is told (README: "Faults, and what is kept")."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fastdeit.cli.commands import app, build_train_config
from fastdeit.data.folder import scan_split
from fastdeit.distill.cache_format import CacheReader
from fastdeit.pipelines import dali
from fastdeit.pipelines.dali import decode as dali_decode
from fastdeit.training.build import make_scheduler
from fastdeit.training.step import Step

from tiny import TINY_MODEL, TINY_RUN

runner = CliRunner()
needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed")
ADVICE = "weights_only=False"  # torch's advice on a refused pickle: never to be passed on


def run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.stdout, res.stderr


def one_line(args: list[str], words: str) -> str:
    """Exit 2, a single error line naming `words`, no traceback."""
    code, _, err = run(*args)
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error:") and words in lines[-1], (code, err)
    return lines[-1]


def train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *TINY_RUN, *TINY_MODEL, "--data", str(data), "--model", "deit_tiny", "--out", str(out), *extra]


def trained(data: Path, out: Path, *extra: str) -> Path:
    code, _, err = run(*train(data, out, *extra))
    assert code == 0, err
    return out


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


@pytest.fixture
def data(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def gif_named_jpg(path: Path) -> None:
    """A file PIL reads and DALI refuses."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "GIF")
    path.write_bytes(buf.getvalue())


def corrupt_scan(path: Path) -> None:
    """Damage a JPEG's entropy-coded data near its end, where PIL refuses the file and
    libjpeg-turbo in DALI decodes it with a warning."""
    raw = path.read_bytes()
    for frac in np.linspace(0.85, 0.99, 29):
        at = int(len(raw) * frac)
        bad = raw[:at] + bytes(b ^ 0xFF for b in raw[at:at + 8]) + raw[at + 8:]
        try:
            Image.open(io.BytesIO(bad)).convert("RGB")
            continue
        except OSError:
            pass
        if not dali_decode._refused([np.frombuffer(bad, np.uint8)], 1, None):
            path.write_bytes(bad)
            return
    raise AssertionError(f"no damage of {path} that DALI reads and PIL refuses")


# --- 1, 2, 10: files one decoder refuses ------------------------------------------------------

@needs_dali
def test_dali_eval_skips_what_it_cannot_decode_and_keeps_the_epoch(data, tmp_path):
    victim = sorted((data / "val").glob("*/*.jpg"))[3]
    gif_named_jpg(victim)
    out = trained(data, tmp_path / "run", "--loader", "dali")
    epoch = records(out, "epoch")[-1]
    assert epoch["eval_unreadable"] == 1 and (out / "checkpoint-last.pt").exists()
    code, stdout, _ = run("eval", "--data", str(data), "--ckpt", str(out / "checkpoint-last.pt"), "--loader", "dali",
                          "--workers", "1")
    got = json.loads(stdout.splitlines()[-1])
    assert code == 0 and got["unreadable"] == 1 and got["images"] == 17 and got["top1"] == pytest.approx(epoch["top1"])


@needs_dali
def test_dali_training_skips_a_file_only_pil_reads_and_check_data_lists_it(data, tmp_path):
    victim = sorted((data / "train").glob("*/*.jpg"))[5]
    gif_named_jpg(victim)
    out = trained(data, tmp_path / "run", "--loader", "dali")
    assert json.loads((out / "summary.json").read_text())["bad_files"] == [str(victim.relative_to(data / "train"))]
    code, stdout, err = run("check-data", str(data))
    assert code == 0 and stdout.split() == [str(victim.relative_to(data))] and "dali refused 1" in err


@needs_dali
def test_both_loaders_evaluate_the_same_val_images(data, tmp_path):
    victim = sorted((data / "val").glob("*/*.jpg"))[2]
    corrupt_scan(victim)  # DALI would decode it, the reference does not
    out = trained(data, tmp_path / "run")
    results = {}
    for loader in ("torch", "dali"):
        code, stdout, _ = run("eval", "--data", str(data), "--ckpt", str(out / "checkpoint-last.pt"),
                              "--loader", loader, "--workers", "1")
        assert code == 0
        results[loader] = json.loads(stdout.splitlines()[-1])
    assert results["torch"]["images"] == results["dali"]["images"] == 17
    assert results["torch"]["unreadable"] == results["dali"]["unreadable"] == 1


# --- 3, 6, 7: resuming ------------------------------------------------------------------------

def test_resuming_into_another_runs_folder_is_refused(data, tmp_path):
    a, b = trained(data, tmp_path / "a"), trained(data, tmp_path / "b")
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    one_line(train(data, b, "--resume", str(a / "checkpoint-last.pt")), "another folder's checkpoint")
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before
    trained(data, tmp_path / "c", "--resume", str(a / "checkpoint-last.pt"))  # an empty folder continues it


def test_resume_applies_a_new_lr_and_more_epochs(data, tmp_path):
    out = trained(data, tmp_path / "run", "--set", "run.log_every=1")
    res = runner.invoke(app, train(data, out, "--resume=auto", "--set", "run.log_every=1", "--epochs", "2",
                                   "--lr", "1e-3"))
    assert res.exit_code == 0 and "optim.lr 0.004 -> 0.001" in res.stderr and "sched.epochs 1 -> 2" in res.stderr
    cfg = build_train_config("demo", {"data.path": data, "run.out": out, "sched.epochs": 2, "optim.lr": 1e-3},
                             ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
                              "run.batch_size=16", "data.img_size=32", "aug.mix_group=8"])
    model = torch.nn.Linear(1, 1)
    sched = make_scheduler(cfg, torch.optim.SGD(model.parameters(), lr=cfg.optim.lr * 16 / 512), 4)
    for step in records(out, "step")[4:]:  # epoch 1: the new schedule, at each update
        sched.step_update(step["updates"])
        assert step["lr"] == pytest.approx(sched.optimizer.param_groups[0]["lr"]), step
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 1e-3


def test_resume_checks_the_classes_and_the_data(data, tmp_path):
    out = trained(data, tmp_path / "run")
    ckpt = str(out / "checkpoint-last.pt")
    extra = sorted((data / "train").glob("*/*.jpg"))[0]
    shutil.copy(extra, extra.with_name("extra.jpg"))
    one_line(train(data, out, "--resume", ckpt), "the training data changed")
    extra.with_name("extra.jpg").unlink()
    first = sorted((data / "train").iterdir())[0]
    for split in ("train", "val"):
        (data / split / first.name).rename(data / split / "renamed")
    one_line(train(data, out, "--resume", ckpt), "trained on other classes")


# --- 4, 8, 12, 13: the teacher cache ----------------------------------------------------------

PLAN = ["--recipe", "demo", "--img-size", "32", "--batch-size", "16", "--set", "aug.mix_group=8",
        "--set", "data.workers=0"]


def cache_teacher(data: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    return ["cache-teacher", "--data", str(data), "--teacher", "resnet10t", "--teacher-ckpt", str(teacher),
            "--out", str(out), *PLAN, *extra]


def replay_student(data: Path, out: Path, teacher: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", *TINY_RUN, *TINY_MODEL, *PLAN, "--data", str(data), "--model", "deit_tiny_distilled",
            "--out", str(out), "--distill", "hard", "--teacher", "resnet10t", "--teacher-ckpt", str(teacher),
            "--targets", "replay", "--teacher-cache", str(cache), *extra]


def test_a_smaller_request_never_shrinks_a_cache(data, teacher, tmp_path):
    cache = tmp_path / "cache"
    assert run(*cache_teacher(data, cache, teacher, "--epochs", "2"))[0] == 0
    rows = CacheReader(cache).rows_available()
    code, _, err = run(*cache_teacher(data, cache, teacher, "--epochs", "1"))
    assert code == 0 and "already holds" in err and CacheReader(cache).rows_available() == rows == 128


def test_a_shard_from_another_cache_is_refused_and_a_corrupt_one_rebuilt(data, teacher, tmp_path, monkeypatch):
    small = ("--set", "distill.cache_shard_rows=32")
    ours, other = tmp_path / "ours", tmp_path / "other"
    assert run(*cache_teacher(data, ours, teacher, "--epochs", "1", *small))[0] == 0
    assert run(*cache_teacher(data, other, teacher, "--epochs", "1", "--seed", "1", *small))[0] == 0
    good = (ours / "shard-00001.npy").read_bytes()
    for suffix in (".npy", ".sha256"):  # the other cache's shard, with its own checksum
        shutil.copy(other / f"shard-00001{suffix}", ours / f"shard-00001{suffix}")
    one_line(replay_student(data, tmp_path / "r", teacher, ours, "--epochs", "1"),
             "shard-00001.npy is corrupted or belongs to another cache")
    code, _, err = run(*cache_teacher(data, ours, teacher, "--epochs", "1", *small))  # a re-run rebuilds it
    assert code == 0 and "shard-00001.npy does not match its checksum" in err
    assert (ours / "shard-00001.npy").read_bytes() == good


def test_a_truncated_shard_is_one_line(data, teacher, tmp_path):
    cache = tmp_path / "cache"
    assert run(*cache_teacher(data, cache, teacher, "--epochs", "1"))[0] == 0
    shard = cache / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    one_line(replay_student(data, tmp_path / "r", teacher, cache, "--epochs", "1"), "shard-00000.npy is truncated")


def test_a_cache_of_another_plan_names_the_field_and_both_values(data, teacher, tmp_path):
    cache = tmp_path / "cache"
    assert run(*cache_teacher(data, cache, teacher, "--epochs", "1"))[0] == 0
    one_line(replay_student(data, tmp_path / "r", teacher, cache, "--epochs", "1", "--seed", "6"),
             "built for another plan: seed 0 in the cache, 6 in this run")
    one_line(replay_student(data, tmp_path / "r", teacher, cache, "--epochs", "1", "--set", "aug.reprob=0.5"),
             "aug.reprob 0.0 in the cache, 0.5 in this run")


# --- 5, 9: the loop -----------------------------------------------------------------------------

def test_diverged_weights_never_replace_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    real = Step.update

    def poisoned(self, batch, number):
        parts = real(self, batch, number)
        if number == 3:  # the weights blow up; the loss is not logged at this step
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return parts

    monkeypatch.setattr(Step, "update", poisoned)
    out = tmp_path / "run"
    line = one_line(train(data, out, "--set", "run.ckpt_every=1", "--set", "run.log_every=100"),
                    "the weights stopped being finite")
    assert "checkpoint-last.pt (the last good state) is kept" in line
    good = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert good["state"]["updates"] == 2 and all(torch.isfinite(v).all() for v in good["model"].values())
    assert (out / "checkpoint-diverged.pt").exists()


def test_mid_epoch_checkpoints_do_not_inflate_img_s(data, tmp_path):
    out = trained(data, tmp_path / "run", "--set", "run.ckpt_every=1", "--set", "run.log_every=1")
    fastest = max(r["img_s"] for r in records(out, "step"))
    assert records(out, "epoch")[0]["train_img_s"] <= 1.2 * fastest


# --- 11, 12: unreadable checkpoints and other bad input ---------------------------------------

class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.mark.parametrize("kind", ["truncated", "random", "random-index", "random-key", "empty", "pickle"])
def test_an_unreadable_checkpoint_is_one_line(data, tmp_path, kind):
    out = trained(data, tmp_path / "run")
    good = (out / "checkpoint-last.pt").read_bytes()
    bad = tmp_path / f"{kind}.pt"
    bad.write_bytes({"truncated": good[: len(good) // 2], "random": os.urandom(4096), "empty": b"",
                     "random-index": random.Random(2).randbytes(4096), "random-key": random.Random(20).randbytes(4096),
                     "pickle": pickle.dumps({"model": Payload()}, protocol=2)}[kind])
    for args in (train(data, tmp_path / "new", "--resume", str(bad)),
                 ["eval", "--data", str(data), "--ckpt", str(bad)]):
        line = one_line(args, str(bad))
        assert ADVICE not in line and ("refused" in line if kind == "pickle" else "not a readable" in line)


@pytest.mark.parametrize("protocol", [0, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_a_plain_pickle_of_objects_is_refused_as_such(data, tmp_path, protocol):
    """Not torch's zip format: objects are named from the pickle's opcodes, never run."""
    for obj, words in ((Payload(), "holds Python objects besides tensors: refused"),
                       ({"model": Payload()}, "holds Python objects besides tensors: refused"),
                       ({"model": [1.0, 2.0]}, "is not a readable")):
        bad = tmp_path / "plain.pt"
        bad.write_bytes(pickle.dumps(obj, protocol=protocol))
        for args in (train(data, tmp_path / "new", "--resume", str(bad)),
                     ["eval", "--data", str(data), "--ckpt", str(bad)]):
            assert ADVICE not in one_line(args, words)


def test_a_full_disk_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    out = trained(data, tmp_path / "run")
    before = (out / "checkpoint-last.pt").read_bytes()
    real = torch.save

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    line = one_line(train(data, out, "--resume=auto", "--epochs", "2"), f"the disk holding {out} is full (")
    assert "the previous checkpoint-last.pt is kept: free some space, then run the same command" in line, line
    monkeypatch.setattr(torch, "save", real)
    assert (out / "checkpoint-last.pt").read_bytes() == before and not list(out.glob("*.tmp"))


def test_header_bombs_symlink_loops_and_unreadable_folders(data, tmp_path, monkeypatch):
    bomb = sorted((data / "train").glob("*/*.jpg"))[0]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")  # the frame header: height and width follow the length and precision
    raw[sof + 5:sof + 9] = (65000).to_bytes(2, "big") * 2
    bomb.write_bytes(bytes(raw))
    loop = bomb.parent / "loop.jpg"
    loop.symlink_to(loop)
    index = scan_split(data, "train")  # the header scan skips both, as unreadable
    assert {index.paths[i] for i in index.skip} == {str(p.relative_to(data / "train")) for p in (bomb, loop)}
    trained(data, tmp_path / "run")
    code, stdout, _ = run("check-data", str(data), "--loader", "torch")
    assert code == 0 and {str(bomb.relative_to(data)), str(loop.relative_to(data))} <= set(stdout.split())
    import fastdeit.data.folder as folder

    real = folder.os.listdir

    def denied(path):
        if Path(path).name == bomb.parent.name:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path)

    monkeypatch.setattr(folder.os, "listdir", denied)
    one_line(train(data, tmp_path / "denied"), "cannot read the folder")


def test_more_bad_paths_and_values(data, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    one_line(train(data, tmp_path / "a-file"), "is a file, not a run folder")
    one_line(["check-data", str(data), "--out", str(tmp_path)], "is a folder")
    one_line(["eval", "--data", str(data), "--ckpt", str(tmp_path / "x.pt"), "--workers", "-1"], "--workers")
    odd = tmp_path / "d[red]x"
    one_line(train(odd, tmp_path / "r"), "d[red]x")  # square brackets in a path are printed as they are


def test_a_cache_covering_no_epoch_says_so(data, teacher, tmp_path, monkeypatch):
    from fastdeit.distill.sources import LiveTeacher

    cache = tmp_path / "cache"
    real, calls = LiveTeacher.__call__, {"n": 0}

    def dies(self, *a):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(LiveTeacher, "__call__", dies)
    run(*cache_teacher(data, cache, teacher, "--epochs", "1", "--set", "distill.cache_shard_rows=16"))
    monkeypatch.setattr(LiveTeacher, "__call__", real)
    one_line(replay_student(data, tmp_path / "r", teacher, cache, "--epochs", "1"), "covers no whole epoch of this")


# --- 15 ---------------------------------------------------------------------------------------

def test_make_data_never_writes_into_a_users_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    one_line(["make-data", str(tmp_path / "mine"), "--classes", "2", "--train-per-class", "2",
              "--val-per-class", "1"], "not empty")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_one_class_data_set_is_warned_about(data, tmp_path):
    for split in ("train", "val"):
        for folder in sorted((data / split).iterdir())[1:]:
            shutil.rmtree(folder)
    res = runner.invoke(app, train(data, tmp_path / "run"))
    assert res.exit_code == 0 and "has a single class" in res.stderr


def test_a_run_folder_is_removed_only_when_it_holds_nothing_else(tmp_path):
    from fastdeit.errors import UserError
    from fastdeit.training.rundir import RunDir

    folder = RunDir(tmp_path / "run")
    folder.remove()  # nothing there: nothing to do
    folder.create()
    folder.log({"epoch": 0})
    (folder.root / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"run holds files that are not a fastdeit run \(notes.txt\): pick another"):
        folder.remove()
    assert (folder.root / "notes.txt").read_text() == "mine" and folder.metrics.exists()
    (folder.root / "notes.txt").unlink()
    folder.remove()
    assert not folder.root.exists()
