"""Teacher caches: replay equals live, label maps pool and mix, and the cache refuses to lie."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.config.schema import CacheMode, TeacherTargets, choices
from fastdeit.distill.cache_build import BUILDS
from fastdeit.distill.cache_format import CacheReader, CacheWriter, dtype_text
from fastdeit.distill.sources import LiveTeacher, pooled_scores, replay_dtype, topk_log_probs
from fastdeit.distill.targets import TARGETS
from fastdeit.errors import UserError

from tiny import TINY_MODEL, TINY_RUN

runner = CliRunner()
PLAN = ["--recipe", "demo", "--img-size", "32", "--batch-size", "16", "--set", "aug.mix_group=8",
        "--set", "aug.mixup=0.8", "--set", "aug.cutmix=1.0", "--set", "aug.reprob=0.25",
        "--set", "aug.rand_augment=rand-m9-mstd0.5-inc1", "--set", "data.workers=0"]


def ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.stdout


def fails(args: list[str], words: str, before_start: bool = True) -> None:
    """Exit 2 with one error line, no traceback; `before_start`: nothing else was printed."""
    res = runner.invoke(app, args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert lines[-1].startswith("error:") and words in lines[-1], res.stderr
    assert not before_start or len(lines) == 1, res.stderr


def steps(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["epoch"], r["step"]): r for r in lines if r["kind"] == "step"}


@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    ok(["train", *TINY_RUN, "--data", str(tiny_data), "--model", "resnet10t", "--out", str(out), "--epochs", "2"])
    return out / "checkpoint-last.pt"


@pytest.fixture(scope="module")
def replay(tiny_data, teacher, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache") / "replay"
    ok(["cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(teacher), "--out", str(cache),
        "--epochs", "2", *PLAN])
    return cache


def student(tiny_data, out, teacher, *extra) -> list[str]:
    return ["train", *TINY_RUN, *TINY_MODEL, *PLAN, "--data", str(tiny_data), "--model", "deit_tiny_distilled",
            "--out", str(out), "--epochs", "2", "--distill", "hard", "--teacher-ckpt", str(teacher),
            "--set", "run.log_every=1", *extra]


def test_replay_equals_live_exactly(tiny_data, teacher, replay, tmp_path):
    ok(student(tiny_data, tmp_path / "live", teacher))
    ok(student(tiny_data, tmp_path / "replay", teacher, "--targets", "replay", "--teacher-cache", str(replay)))
    live, rep = steps(tmp_path / "live"), steps(tmp_path / "replay")
    assert len(live) == 8 and live.keys() == rep.keys()
    for key in live:
        assert live[key]["loss"] == rep[key]["loss"], key  # the same labels give the same bits
        assert live[key]["loss_distill"] == rep[key]["loss_distill"]


def test_replay_without_teacher_weights_takes_the_caches_record(tiny_data, teacher, replay, tmp_path, monkeypatch):
    """A run that only replays a cache loads no teacher (nor downloads one) unless --teacher-ckpt
    asks for the check: it trains as the checked run does, config.json says whose record it took,
    and --teacher must still name the cache's teacher."""
    checked = tmp_path / "checked"
    ok(student(tiny_data, checked, teacher, "--targets", "replay", "--teacher-cache", str(replay)))

    def no_teacher(*args, **kwargs):
        raise AssertionError("a replay run without --teacher-ckpt loaded a teacher")

    monkeypatch.setattr("fastdeit.distill.sources.load_teacher", no_teacher)
    unchecked = tmp_path / "unchecked"
    args = [a for a in student(tiny_data, unchecked, teacher) if a not in ("--teacher-ckpt", str(teacher))]
    res = runner.invoke(app, [*args, "--teacher", "resnet10t", "--targets", "replay", "--teacher-cache", str(replay)])
    assert res.exit_code == 0 and "not checked: no --teacher-ckpt" in res.stderr, res.output
    losses = {k: (r["loss"], r["loss_distill"]) for k, r in steps(checked).items()}
    assert len(losses) == 8 and losses == {k: (r["loss"], r["loss_distill"]) for k, r in steps(unchecked).items()}
    sha = json.loads((replay / "manifest.json").read_text())["teacher_sha256"]
    picked = json.loads((unchecked / "config.json").read_text())["provenance"]
    assert picked["teacher"].startswith(f"resnet10t, weights sha256 {sha[:16]} as {replay} records them")
    assert json.loads((checked / "config.json").read_text())["provenance"]["teacher"].endswith(f"from {teacher}")
    other = [a if a != str(unchecked) else str(tmp_path / "other") for a in args]
    fails([*other, "--teacher", "resnet18", "--targets", "replay", "--teacher-cache", str(replay)],
          "built for another teacher: resnet10t in the cache, resnet18 in this run", before_start=False)


def test_verify_reports_full_agreement_on_the_same_backend(tiny_data, teacher, replay):
    out = ok(["cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(teacher), "--out", str(replay),
              "--verify", "3", *PLAN])
    assert json.loads(out.splitlines()[-1]) == {"verify_batches": 3, "agreement": 1.0}


def test_soft_targets_from_all_logits_are_exact():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    val, idx = logits.topk(5, dim=1)
    for tau in (1.0, 2.5):
        got = topk_log_probs(idx, val, torch.logsumexp(logits, 1), 5, tau)
        assert torch.allclose(got, torch.log_softmax(logits / tau, 1), atol=1e-5)
    val, idx = logits.topk(2, dim=1)  # fewer: the top-2 keep their probability, the rest share the remainder
    got = topk_log_probs(idx, val, torch.logsumexp(logits, 1), 5, 1.0).exp()
    p = logits.softmax(1)
    assert torch.allclose(got.gather(1, idx), p.gather(1, idx), atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(6), atol=1e-5)


def test_labelmap_pooling_follows_the_box():
    grid, classes = 2, 4
    rec = np.zeros(1, [("idx", "<i2", (4, 1)), ("val", "<f2", (4, 1))])
    rec["idx"][0, :, 0] = [0, 1, 2, 3]  # cell (row, col) -> class: (0,0)->0 (0,1)->1 (1,0)->2 (1,1)->3
    rec["val"][0, :, 0] = 1.0
    sizes = np.array([[100, 60]])
    whole = pooled_scores(rec, np.array([[0, 0, 100, 60]]), sizes, grid, classes, torch.device("cpu"))
    assert torch.allclose(whole, torch.full((1, 4), 0.25), atol=1e-6)
    right_bottom = pooled_scores(rec, np.array([[50, 30, 50, 30]]), sizes, grid, classes, torch.device("cpu"))
    # RoIAlign samples the box at 2x2 points, bilinear between cell centres (aligned=True):
    # along each axis the points sit at 0.75 and 1.25 cells -> weights 1/8 and 7/8.
    a, b = 1 / 8, 7 / 8
    assert torch.allclose(right_bottom, torch.tensor([[a * a, a * b, b * a, b * b]]), atol=1e-6)


def test_labelmap_targets_report_agreement(tiny_data, teacher, tmp_path):
    res = runner.invoke(app, student(tiny_data, tmp_path / "lm", teacher, "--targets", "labelmap",
                                     "--set", "distill.labelmap_size=64"))
    assert res.exit_code == 0, res.output
    assert "the teacher was trained at 32 px and its label maps are built at 64 px" in res.stderr
    epochs = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in x]
    assert all(0.0 <= e["target_agreement"] <= 1.0 for e in epochs) and len(epochs) == 2
    manifest = json.loads((tmp_path / "lm" / "teacher-labelmap" / "manifest.json").read_text())
    assert manifest["mode"] == "labelmap" and manifest["grid"] == 2


def test_the_cache_refuses_another_teacher_data_plan_or_epoch(tiny_data, teacher, replay, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), other)
    base = student(tiny_data, tmp_path / "r", teacher, "--targets", "replay", "--teacher-cache", str(replay))
    fails([*student(tiny_data, tmp_path / "r", other, "--teacher", "resnet10t", "--targets", "replay",
                    "--teacher-cache", str(replay))], "built for another teacher sha256")
    fails([*base, "--seed", "3"], "built for another plan")
    fails([*base, "--set", "aug.reprob=0.5"], "built for another plan")
    fails([*base, "--epochs", "3"], "covers epochs 0-1, not epoch 2")
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    extra = sorted((data / "train").glob("*/*.jpg"))[0]
    shutil.copy(extra, extra.with_name("extra.jpg"))
    fails([*student(data, tmp_path / "r", teacher, "--targets", "replay", "--teacher-cache", str(replay))],
          "built for another dataset")
    fails([*student(tiny_data, tmp_path / "r", teacher, "--targets", "replay")],
          "--targets replay needs --teacher-cache")


def test_a_corrupted_shard_is_detected(tiny_data, teacher, replay, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(replay, cache)
    shard = cache / "shard-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    # shards are checked when first read (a whole cache can be many GB): here at the first step
    fails(student(tiny_data, tmp_path / "r", teacher, "--targets", "replay", "--teacher-cache", str(cache)),
          "shard-00000.npy is corrupted or belongs to another cache", before_start=False)


def test_an_interrupted_build_resumes_to_the_same_cache(tiny_data, teacher, replay, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    build = ["cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(teacher), "--out", str(cache),
             "--epochs", "2", *PLAN, "--set", "distill.cache_shard_rows=32"]  # two batches a shard
    calls = {"n": 0}
    real = LiveTeacher.__call__

    def dies_after_five(self, *a):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(LiveTeacher, "__call__", dies_after_five)
    res = runner.invoke(app, build)
    assert res.exit_code != 0
    assert {p.name for p in cache.glob("shard-*.sha256")} == {"shard-00000.sha256", "shard-00001.sha256"}
    (cache / "shard-00002.npy").write_bytes(b"half a shard, never finished")  # no checksum: never read
    monkeypatch.setattr(LiveTeacher, "__call__", real)
    calls["n"] = 0
    ok(build)
    resumed = CacheReader(cache).rows(np.arange(128))
    whole = CacheReader(replay).rows(np.arange(128))
    assert np.array_equal(resumed["label"], whole["label"]) and np.array_equal(resumed["val"], whole["val"])


def test_the_registry_is_what_config_and_the_builds_name():
    """teachers.TARGETS declares each source; config's choice types (the CLI's help and checks)
    and caching.BUILDS (one build per cache kind) must name the same ones."""
    kinds = [t.cache for t in TARGETS.values() if t.cache is not None]
    assert tuple(TARGETS) == choices(TeacherTargets)
    assert tuple(kinds) == choices(CacheMode) and set(BUILDS) == set(kinds)
    assert all(t.cache is not None for t in TARGETS.values() if t.built_by_run or t.check or t.covered)


def test_writer_rewrites_a_short_last_shard_when_extended(tmp_path):
    dtype = replay_dtype(2, 4)
    manifest = {"format": 1, "mode": "replay", "shard_rows": 4}
    w = CacheWriter(tmp_path, manifest, dtype)
    rows = np.zeros(6, dtype)
    rows["label"] = np.arange(6)
    w.write_shard(0, rows[:4])
    w.write_shard(1, rows[4:])  # the last shard of a 6-row build
    assert CacheReader(tmp_path).rows_available() == 6
    w2 = CacheWriter(tmp_path, manifest, dtype)
    assert w2.shard_done(0, 4) and w2.shard_done(1, 2)  # enough for 6 rows
    assert not w2.shard_done(1, 4) and not w2.shard_done(2, 4)  # an 8-row build writes shard 1 again, whole
    more = np.zeros(4, dtype)
    more["label"] = np.arange(4, 8)
    w2.write_shard(1, more)
    assert CacheReader(tmp_path).rows(np.arange(8))["label"].tolist() == list(range(8))
    (tmp_path / "shard-00000.npy").write_bytes((tmp_path / "shard-00001.npy").read_bytes())
    assert not w2.shard_done(0, 4) and w2.rebuilt == ["shard-00000.npy"]  # a mismatching shard is rebuilt


def test_rows_in_any_order_across_shards_come_back_in_their_order(tmp_path):
    """A label map's batch asks for rows in the plan's order, spread over every shard, with
    repeats (repeated augmentation): each comes back where it was asked for."""
    dtype = replay_dtype(2, 4)
    w = CacheWriter(tmp_path, {"format": 1, "mode": "replay", "shard_rows": 8}, dtype)
    rows = np.zeros(37, dtype)
    rows["label"] = np.arange(37)
    for k in range(5):
        w.write_shard(k, rows[8 * k:8 * k + 8])
    asked = np.random.default_rng(0).integers(0, 37, 100)
    assert CacheReader(tmp_path).rows(asked)["label"].tolist() == asked.tolist()
    assert len(CacheReader(tmp_path).rows(np.array([], np.int64))) == 0


def test_two_ranks_build_the_bytes_of_one(tiny_data, teacher, tmp_path):
    """cache-teacher --gpus 0 --procs 2: each rank builds every other shard; replay and label
    maps equal a one-process build byte for byte."""
    import os
    import subprocess
    import sys

    def files(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(root.iterdir())}

    small = ["--set", "distill.cache_shard_rows=32"]
    base = ["cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(teacher), "--epochs", "2", *PLAN]
    for mode in ("replay", "labelmap"):
        one, two = tmp_path / f"{mode}-one", tmp_path / f"{mode}-two"
        ok([*base, "--mode", mode, "--out", str(one), *small])
        res = subprocess.run([sys.executable, "-c", "from fastdeit.cli.commands import run_app; run_app()", *base,
                              "--mode", mode, "--out", str(two), *small, "--gpus", "0", "--procs", "2"],
                             capture_output=True, text=True, timeout=600, env=os.environ.copy())
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout.strip().splitlines()[-1])["rows"] == CacheReader(one).rows_available()
        assert len(list(one.glob("shard-*.npy"))) >= 3 and files(one) == files(two)


@pytest.mark.skipif(not __import__("fastdeit.pipelines.dali", fromlist=["x"]).available(), reason="no DALI")
def test_verify_with_dali_agrees_fully_with_a_dali_built_cache(tiny_data, teacher, tmp_path):
    """--verify picks batches out of order: each must come out of DALI for its own position."""
    cache = tmp_path / "dali"
    ok(["cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(teacher), "--out", str(cache),
        "--epochs", "2", "--loader", "dali", *PLAN])
    out = ok(["cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(teacher), "--out", str(cache),
              "--verify", "6", "--loader", "dali", *PLAN])
    assert json.loads(out.splitlines()[-1]) == {"verify_batches": 6, "agreement": 1.0}


@pytest.mark.gpu
def test_a_batch_of_records_waits_for_the_gpu_once():
    """cache-teacher turns each batch of teacher logits into records: the copies to the host
    are queued together and waited for once (four .cpu() calls waited four times), and the
    records are those computed on the CPU."""
    import warnings

    from fastdeit.distill.sources import replay_records

    logits = torch.randn(256, 1000, generator=torch.Generator().manual_seed(0))
    dtype = replay_dtype(10, 1000)
    want = replay_records(logits, 10, dtype)
    on_gpu = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = replay_records(on_gpu, 10, dtype)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    waits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(waits) <= 1, [str(w.message) for w in waits]
    for name in dtype.names:
        assert np.array_equal(got[name], want[name]) if name in ("label", "idx") else np.allclose(got[name], want[name])


def test_a_3_augment_plan_replays_exactly_and_a_randaugment_cache_is_refused(tiny_data, teacher, replay, tmp_path):
    """DeiT III's 3-Augment draws live in the plan too: a cache built under it replays the live
    teacher's targets bit for bit, and a cache of the RandAugment plan is refused for it."""
    three = ["--set", "aug.three_augment=true", "--set", "aug.rand_augment="]
    cache = tmp_path / "three"
    ok(["cache-teacher", "--data", str(tiny_data), "--teacher-ckpt", str(teacher), "--out", str(cache),
        "--epochs", "2", *PLAN, *three])
    ok(student(tiny_data, tmp_path / "live", teacher, *three))
    ok(student(tiny_data, tmp_path / "replay", teacher, *three, "--targets", "replay", "--teacher-cache", str(cache)))
    live, rep = steps(tmp_path / "live"), steps(tmp_path / "replay")
    assert len(live) == 8 and live.keys() == rep.keys()
    assert all(live[k]["loss"] == rep[k]["loss"] and live[k]["loss_distill"] == rep[k]["loss_distill"] for k in live)
    res = runner.invoke(app, student(tiny_data, tmp_path / "wrong", teacher, *three, "--targets", "replay",
                                     "--teacher-cache", str(replay)))
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and "built for another plan" in line, res.output


def test_labelmap_shards_are_sized_by_bytes_and_a_resumed_cache_keeps_its_own(tmp_path):
    """A label map batch touches about every shard of its cache: ImageNet's maps (7 x 7 cells,
    top-5, 1,000 classes) come in shards of LABELMAP_SHARD_BYTES, 38 of them, not 313 of
    4,096 rows; a smaller distill.cache_shard_rows wins, and a cache built with another size
    (an older fastdeit's 4,096) resumes with its own."""
    from fastdeit.distill.cache_build import LABELMAP_SHARD_BYTES, labelmap_shard_rows
    from fastdeit.distill.sources import labelmap_dtype

    dtype = labelmap_dtype(5, 1000, 49)
    rows = labelmap_shard_rows(tmp_path, dtype, 65536)
    assert rows * dtype.itemsize <= LABELMAP_SHARD_BYTES < (rows + 1) * dtype.itemsize
    assert -(-1_281_167 // rows) == 38
    assert labelmap_shard_rows(tmp_path, dtype, 16) == 16
    CacheWriter(tmp_path, {"format": 2, "mode": "labelmap", "shard_rows": 4096,
                           "record_dtype": dtype_text(dtype)}, dtype)
    assert labelmap_shard_rows(tmp_path, dtype, 65536) == 4096
    for odd in (True, "8", -1, None):  # a manifest edited by hand: not kept, and the writer names the difference
        (tmp_path / "manifest.json").write_text(json.dumps({"format": 2, "mode": "labelmap", "shard_rows": odd,
                                                            "record_dtype": dtype_text(dtype)}))
        assert labelmap_shard_rows(tmp_path, dtype, 65536) == rows
        with pytest.raises(UserError, match="another shard_rows"):
            CacheWriter(tmp_path, {"format": 2, "mode": "labelmap", "shard_rows": rows,
                                   "record_dtype": dtype_text(dtype)}, dtype)
    other = labelmap_dtype(3, 1000, 49)  # another cache's records: the writer refuses it, by name
    assert labelmap_shard_rows(tmp_path, other, 65536) == LABELMAP_SHARD_BYTES // other.itemsize


@pytest.mark.parametrize("classes", [1000, 40000])  # class indices stored as int16, and as int32
def test_label_map_records_cross_as_their_bytes_and_widen_on_the_device(classes):
    """The host ships a record's bytes as the cache stores them; the device's classes and
    scores are the fields the host would have widened, value for value."""
    from fastdeit.distill.sources import labelmap_dtype, pooling_inputs, record_fields

    dtype = labelmap_dtype(3, classes, 4)
    rng = np.random.default_rng(0)
    rec = np.zeros(6, dtype)
    rec["idx"] = rng.integers(0, classes, rec["idx"].shape)
    rec["val"] = rng.random(rec["val"].shape)
    raw = pooling_inputs(rec[::-1], np.ones((6, 4), np.int32), np.full((6, 2), 8), 2)["labelmap.rec"]
    assert raw.dtype == np.uint8 and raw.shape == (6, dtype.itemsize)
    idx, val = record_fields(torch.from_numpy(raw), 2, classes)
    assert idx.dtype == torch.int64 and val.dtype == torch.float32
    assert np.array_equal(idx.numpy(), rec["idx"][::-1].astype(np.int64))
    assert np.array_equal(val.numpy(), rec["val"][::-1].astype(np.float32))
