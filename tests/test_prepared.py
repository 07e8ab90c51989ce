"""Prepared data sets: the same pixels as their source, resumable to the same bytes, corrupt
sources left out, and runs on them equal to runs on the tree."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.config.schema import AugConfig
from fastdeit.data.folder import load_dataset
from fastdeit.data.plan import PlanSpec, make_plan
from fastdeit.data.preparing import PrepareOptions, prepare_data
from fastdeit.pipelines import dali
from fastdeit.pipelines.reference import load_plan_rows

from tiny import TINY_MODEL, TINY_RUN

runner = CliRunner()
SPEC = PlanSpec(seed=1, img_size=32, batch_size=16, aug=AugConfig(mix_group=8, rand_augment="rand-m9-mstd0.5-inc1"))


def ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.stdout


def fails(args: list[str], words: str) -> None:
    res = runner.invoke(app, args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert lines[-1].startswith("error:") and words in lines[-1], res.stderr


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def same(tiny_data, tmp_path_factory) -> Path:
    """The tiny tree prepared with its bytes unchanged."""
    out = tmp_path_factory.mktemp("prepared") / "same"
    prepare_data(tiny_data, out, PrepareOptions(max_side=0, shard_rows=16, workers=2))
    return out


def test_unchanged_bytes_decode_to_the_source_pixels(tiny_data, same):
    tree, prep = load_dataset(tiny_data)[0], load_dataset(same)[0]
    assert prep.store is not None and prep.paths == tree.paths and prep.fingerprint() == tree.fingerprint()
    assert np.array_equal(prep.sizes, tree.sizes) and np.array_equal(prep.labels, tree.labels)
    spec = SPEC
    for step in range(2):
        plan = make_plan(spec, tree.sizes, 0, step)
        a, b = load_plan_rows(tree, spec, plan), load_plan_rows(prep, spec, plan)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed")
def test_dali_reads_the_shards_like_the_files(tiny_data, same):
    tree, prep = load_dataset(tiny_data)[0], load_dataset(same)[0]
    spec = SPEC
    a = next(iter(dali.DaliTrainLoader(tree, spec, torch.device("cpu"), threads=2).epoch(0, 0)))
    for readers in (0, 2):  # in the training thread, and in reader processes (each maps the shards itself)
        loader = dali.DaliTrainLoader(prep, spec, torch.device("cpu"), threads=2, readers=readers)
        b = next(iter(loader.epoch(0, 0)))
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_shards_are_plain_tar_files(same):
    out = subprocess.run(["tar", "tf", str(same / "train" / "shard-00000.tar")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split()[0].endswith(".jpg")


def test_shrunk_images_keep_their_aspect_and_the_picture(tiny_data, tmp_path):
    out = tmp_path / "small"
    ok(["prepare-data", str(tiny_data), str(out), "--max-side", "24", "--quality", "95", "--workers", "1"])
    tree, prep = load_dataset(tiny_data)[0], load_dataset(out)[0]
    assert prep.sizes.max() <= 24 and prep.fingerprint() != tree.fingerprint()
    ratio = lambda s: s[:, 0] / s[:, 1]  # noqa: E731
    assert np.abs(ratio(prep.sizes) - ratio(tree.sizes)).max() < 0.1
    for i in (0, len(tree) - 1):  # the stored JPEG is the source, shrunk: a small mean difference
        small = np.asarray(Image.open(prep.open(i)).convert("RGB"), np.float32)
        ref = np.asarray(Image.open(tree.open(i)).convert("RGB").resize(small.shape[1::-1], Image.LANCZOS),
                         np.float32)
        assert np.abs(small - ref).mean() < 6


def test_a_killed_build_resumes_to_the_same_bytes(tiny_data, same, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from fastdeit.cli.commands import run_app; run_app()", "prepare-data", str(tiny_data),
           str(out),
           "--max-side", "0", "--shard-rows", "4", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "train" / "shard-00003.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its worker process, as a crash would
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build ended before it was killed"
    (out / "train" / "shard-00004.tar.123.tmp").write_bytes(b"half a shard")  # what a killed writer leaves
    ok(["prepare-data", str(tiny_data), str(out), "--max-side", "0", "--shard-rows", "4", "--workers", "1"])
    whole = tmp_path / "whole"
    prepare_data(tiny_data, whole, PrepareOptions(max_side=0, shard_rows=4, workers=2))
    assert files(out) == files(whole)


def test_a_corrupt_source_file_is_listed_and_left_out(tiny_data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_data, src)
    victims = sorted((src / "train").rglob("*.jpg"))[:2]
    victims[0].write_bytes(victims[0].read_bytes()[:300])  # truncated
    victims[1].write_bytes(b"not an image at all")
    res = runner.invoke(app, ["prepare-data", str(src), str(tmp_path / "out"), "--max-side", "0"])
    assert res.exit_code == 0, res.output
    assert "2 left out" in res.stderr and "does not decode" in res.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    left = [p for p, _ in manifest["splits"]["train"]["left_out"]]
    assert left == [str(v.relative_to(src / "train")) for v in victims]
    train = load_dataset(tmp_path / "out")[0]
    assert len(train) == len(load_dataset(tiny_data)[0]) - 2 and not set(left) & set(train.paths)


def test_bad_requests_are_one_line(tiny_data, same, tmp_path):
    fails(["prepare-data", str(tiny_data), str(same), "--max-side", "64"], "another request (max_side: 0 there")
    fails(["prepare-data", str(same), str(tmp_path / "x")], "already a prepared data set")
    fails(["prepare-data", str(tiny_data), str(tiny_data / "inside")], "inside SRC")
    fails(["prepare-data", str(tiny_data), str(tmp_path / "y"), "--max-side", "8"], "--max-side 8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    fails(["prepare-data", str(tiny_data), str(tmp_path / "full")], "not a prepared data set")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_check_data_finds_a_corrupted_shard(tiny_data, tmp_path):
    out = tmp_path / "p"
    prepare_data(tiny_data, out, PrepareOptions(max_side=0, shard_rows=16, workers=1))
    row = load_dataset(out)[0].store.rows[5]
    with open(out / "train" / "shard-00000.tar", "r+b") as f:
        f.seek(int(row["offset"]) + 40)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    res = runner.invoke(app, ["check-data", str(out), "--loader", "torch"])
    assert res.exit_code == 0 and load_dataset(out)[0].paths[5] in res.stdout.split("train/")[1], res.output


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_cut_shard_is_refused_at_open_by_every_command(tiny_data, tmp_path, split):
    """A shard shorter than its index trained with 'unreadable image' warnings and evaluated
    8 of 32 images with exit 0; check-data was a traceback. Now every reader refuses the set in
    one line naming the shard, and prepare-data repairs it."""
    out = tmp_path / "p"
    prepare_data(tiny_data, out, PrepareOptions(max_side=0, shard_rows=16, workers=1))
    whole = files(out)
    shard = out / split / "shard-00000.tar"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 3)
    words = f"the prepared data set's {shard} is cut short or missing"
    run = tmp_path / "run"
    fails(["train", *TINY_RUN, *TINY_MODEL, "--model", "deit_tiny", "--data", str(out), "--out", str(run)], words)
    fails(["check-data", str(out), "--loader", "torch"], words)
    fails(["eval", "--data", str(out), "--weights", str(shard), "--model", "deit_tiny"], words)
    ok(["prepare-data", str(tiny_data), str(out), "--max-side", "0", "--shard-rows", "16"])
    assert files(out) == whole  # rebuilt byte for byte


RUN = [*TINY_RUN, *TINY_MODEL, "--model", "deit_tiny_distilled", "--set", "run.log_every=1",
       "--set", "aug.mixup=0.8", "--set", "aug.rand_augment=rand-m9-mstd0.5-inc1", "--set", "model.drop_path=0.0"]


def losses(run: Path) -> dict:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["epoch"], r["step"]): r["loss"] for r in recs if r["kind"] == "step"}


def test_train_eval_and_cache_teacher_on_a_prepared_set_equal_the_tree(tiny_data, same, tmp_path):
    torch.manual_seed(0)
    import timm

    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), tmp_path / "teacher.pth")
    teacher = ["--teacher", "resnet10t", "--teacher-ckpt", str(tmp_path / "teacher.pth")]
    out = {}
    for name, data in (("tree", tiny_data), ("prep", same)):
        cache = tmp_path / f"cache-{name}"
        ok(["cache-teacher", "--data", str(data), *teacher, "--out", str(cache), "--epochs", "1", "--recipe", "demo",
            "--img-size", "32", "--batch-size", "16", "--set", "aug.mix_group=8", "--set", "aug.mixup=0.8",
            "--set", "aug.rand_augment=rand-m9-mstd0.5-inc1", "--set", "data.workers=0"])
        ok(["train", *RUN, *teacher, "--data", str(data), "--out", str(tmp_path / name), "--distill", "hard",
            "--targets", "replay", "--teacher-cache", str(cache)])
        ev = ok(["eval", "--data", str(data), "--ckpt", str(tmp_path / name / "checkpoint-last.pt"),
                 "--workers", "0", "--loader", "torch"])
        out[name] = (files(cache), losses(tmp_path / name), json.loads(ev.splitlines()[-1]))
    assert out["tree"][0] == out["prep"][0]  # the same cache, byte for byte
    assert out["tree"][1] == out["prep"][1] and len(out["tree"][1]) >= 4
    assert {k: v for k, v in out["tree"][2].items() if k != "img_s"} == \
        {k: v for k, v in out["prep"][2].items() if k != "img_s"}


def test_the_loader_benchmark_reads_a_prepared_set(same, tmp_path):
    from tiny import load_benchmark

    out = tmp_path / "loader.json"
    rc = load_benchmark("loader").main(["--data", str(same), "--device", "cpu", "--workers", "0", "--batch-size", "8",
                                        "--img-size", "32", "--steps", "2", "--warmup", "1", "--repeats", "1",
                                        "--loader", "torch,baseline", "--out", str(out)])
    assert rc == 0 and set(json.loads(out.read_text())["img_per_s"]) == {"torch"}  # no ImageFolder baseline
