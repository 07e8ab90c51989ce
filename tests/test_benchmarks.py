"""The benchmark scripts run (tiny settings): they must not rot. Speed is not asserted here."""

import json

import pytest

from tiny import ROOT
from tiny import load_benchmark as load


def test_loader_benchmark_runs_and_writes_json(tiny_data, tmp_path):
    out = tmp_path / "loader.json"
    rc = load("loader").main(["--data", str(tiny_data), "--device", "cpu", "--workers", "1", "--batch-size", "8",
                              "--img-size", "32", "--steps", "2", "--warmup", "1", "--repeats", "1",
                              "--prepared", "24", "--prepared-dir", str(tmp_path), "--augment", "rand,three",
                              "--profile", "8", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["device"] and report["versions"]["torch"]
    assert set(report["img_per_s"]) >= {"torch", "torch, prepared 24px", "baseline"}
    assert all(v > 0 for v in report["img_per_s"].values())
    assert report["settings"]["prepared"]["prepared 24px"]["max_side"] == 24
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"  # its bar chart beside it
    assert "torch/baseline" in report["ratios"]
    assert report["ratios"]["torch, 3-Augment/baseline, 3-Augment"] > 0  # 3-Augment against its official twin
    assert set(report["epoch_start_s"]) == set(report["img_per_s"]) and all(
        v > 0 for v in report["epoch_start_s"].values())  # an epoch's start, timed apart from the window
    profile = report["reference_profile_ms_per_image"]  # where the reference's time goes
    assert set(profile) >= {"decode", "crop + resize", "RandAugment", "the batch tail"} and profile["decode"] > 0
    assert 0 < report["crops_at_least_twice_the_output"] < 1  # 64 to 96 px images, 32 px crops: some are


def test_plot_redraws_the_committed_results(tmp_path):
    plot = load("plot")
    for name in ("loader-cpu-2core", "loader-prepared-cpu-2core", "throughput-distill-cpu-2core",
                 "throughput-model-cpu-2core", "throughput-scaling-cpu-2core"):
        results = ROOT / "benchmarks" / "results" / f"{name}.json"
        _title, values, _ = plot.bars(json.loads(results.read_text()))
        assert values and all(v > 0 for v in values.values()), name
        assert plot.main([str(results), "--out", str(tmp_path / f"{name}.png")]) == 0
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_throughput_distill_section_runs(tmp_path):
    out = tmp_path / "t.json"
    rc = load("throughput").main(["--section", "distill", "--device", "cpu", "--student", "deit_tiny_distilled",
                                  "--teacher", "resnet10t", "--img-size", "32", "--batch-size", "8", "--steps", "1",
                                  "--warmup", "1", "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())["distill"]
    assert rc == 0 and set(report["img_per_s"]) == {"none", "live", "replay", "labelmap"}
    assert report["forward_gmacs"]["teacher"] > 0 and all(v > 0 for v in report["img_per_s"].values())


def test_throughput_model_section_runs(tmp_path):
    out = tmp_path / "m.json"
    rc = load("throughput").main(["--device", "cpu", "--models", "deit_tiny_distilled,deit3_small", "--img-sizes",
                                  "32,48", "--patch-size", "8", "--batch-sizes", "4", "--compile", "none", "--quick",
                                  "--depth", "2", "--accum-steps", "1,2", "--out", str(out)])
    rows = json.loads(out.read_text())["model"]
    assert rc == 0 and [r["accum"] for r in rows] == [1, 2] * 4 and not any("error" in r for r in rows)
    want = [("deit_tiny_distilled", 32), ("deit_tiny_distilled", 48), ("deit3_small", 32), ("deit3_small", 48)]
    assert [(r["model"], r["img_size"]) for r in rows[::2]] == want
    assert rows[2]["forward_gmacs"] > 2 * rows[0]["forward_gmacs"]  # (48 / 32)^2 the patches, and more
    assert all(r["train_img_s"] > 0 and r["forward_gmacs"] > 0 and r["mfu"] is None for r in rows)


def test_throughput_scaling_section_runs_two_processes(tmp_path):
    out = tmp_path / "s.json"
    rc = load("throughput").main(["--section", "scaling", "--device", "cpu", "--procs", "1,2", "--img-size", "32",
                                  "--patch-size", "8", "--batch-sizes", "4", "--steps", "1", "--warmup", "1",
                                  "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["scaling"]
    assert rc == 0 and [r["procs"] for r in rows] == [1, 2] and all("error" not in r for r in rows)
    assert rows[0]["allreduce_ms"] is None and rows[1]["allreduce_ms"] > 0 and rows[1]["efficiency"] > 0


def test_projection_arithmetic():
    scaling = load("scaling")
    # Ring all-reduce moves 2 (N-1)/N of the buffer: 8 ranks, 1e9 fp32 values, 400 GB/s -> 17.5 ms.
    assert abs(scaling.allreduce_seconds(1e9, 8, 400.0) - 2 * 7 / 8 * 4e9 / 400e9) < 1e-12
    rows = scaling.project("deit_tiny_distilled", 1000.0, epochs=1)
    assert rows[0]["ranks"] == 8 and 5.0 < rows[0]["params_m"] < 6.5 and rows[0]["hours"] > 0


def test_flops_count_the_attention_on_a_cpu():
    """DeiT-tiny at 224 px: 1.26 GMACs with its attention matmuls (2 x 12 blocks x 198^2 x 192
    = 0.18 G of them), which the flop counter missed in the CPU's fused SDPA."""
    import timm
    import torch

    model = timm.create_model("deit_tiny_distilled_patch16_224")
    gmacs = load("throughput").forward_gmacs(model, 224, torch.device("cpu"))
    assert gmacs == pytest.approx(1.265, abs=0.005)


def test_a_recipe_of_phases_is_projected_phase_by_phase():
    """DeiT III's shape (pre-train small, fine-tune at full size): the measured size keeps its
    img/s, another is scaled by the forward FLOPs, and the hours add up over the phases."""
    scaling = load("scaling")
    assert scaling.parse_phases("800@192,20@224") == [(800, 192), (20, 224)]
    with pytest.raises(SystemExit):
        scaling.parse_phases("800x192")
    out = scaling.project_phases("deit_tiny", [(2, 160), (1, 224)], 1000.0, 224)
    low, full = out["phases"][0], out["phases"][2]
    assert (low["img_size"], full["img_size"]) == (160, 224) and full["img_s"] == 1000.0
    assert low["img_s"] == pytest.approx(1000.0 * full["forward_gmacs"] / low["forward_gmacs"]) and low["img_s"] > 1900
    assert full["img_s_from"] == "measured" and low["img_s_from"].startswith("scaled")
    one_node = [r["hours"] for r in out["phases"] if r["ranks"] == 8]
    assert out["hours"]["1 node x 8 H100 (NVLink)"] == pytest.approx(sum(one_node))


def test_labelmap_scale_reports_each_size(tiny_data, tmp_path):
    from typer.testing import CliRunner

    from fastdeit.cli.commands import app

    from tiny import TINY_RUN

    res = CliRunner().invoke(app, ["train", *TINY_RUN, "--data", str(tiny_data), "--model", "resnet10t",
                                   "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "scale.json"
    rc = load("labelmap_scale").main(["--data", str(tiny_data), "--teacher-ckpt", str(tmp_path / "t" /
                                      "checkpoint-last.pt"), "--sizes", "32,64", "--every", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["trained_img_size"] == 32 and report["images"] == 24
    assert [r["grid"] for r in report["sizes"].values()] == [1, 2]
    assert report["sizes"]["32"]["map_agrees_with_teacher"] == 1.0  # one cell: the map is the teacher's output


def test_loader_timing_starts_after_the_prefetched_batches_and_never_reports_too_few():
    import pytest
    import torch

    loader = load("loader")
    seen = []
    rate = loader.timed_rate(iter(range(100)), lambda b: seen.append(b) or 4, warmup=5, steps=10,
                             device=torch.device("cpu"))
    assert seen == list(range(15)) and rate.img_s > 0  # 5 untimed (the prefetch depth), 10 timed
    with pytest.raises(SystemExit, match="an epoch gave 8 batches, 15 are needed in one epoch"):
        loader.timed_rate(iter(range(8)), lambda b: 4, warmup=5, steps=10, device=torch.device("cpu"))


def test_the_loader_window_never_spans_an_epoch(tiny_data, tmp_path, capsys):
    """A window past an epoch's end timed the next epoch's start (new pipeline, new workers) as
    if it were steady state: refused up front, naming the data the window needs."""
    import pytest

    with pytest.raises(SystemExit):
        load("loader").main(["--data", str(tiny_data), "--device", "cpu", "--workers", "0", "--batch-size", "16",
                             "--img-size", "32", "--steps", "6", "--warmup", "1", "--repeats", "1",
                             "--loader", "torch"])  # 4 batches an epoch
    assert "one epoch is 4 batches; the timed window needs 11 in one epoch" in capsys.readouterr().err


def test_the_gpu_session_script_runs_every_part_dry(tmp_path):
    """`bash benchmarks/gpu_session.sh --dry all`: every part at toy size on the CPU, so the
    script a scarce GPU session runs cannot rot."""
    import os
    import subprocess
    import sys

    res = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry", "all"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for part in ("step-s", "step-b", "step-ti", "step-triton", "step-deit3"):
        report = json.loads((tmp_path / f"throughput-{part}-dry.json").read_text())
        assert report["device"] and report["versions"]["torch"] and report["git_commit"] is not None
        assert report["versions"]["fastdeit"]
        assert report["model"] and all("error" not in row for row in report["model"]), part
    kinds = ("dali", "dali-full", "dali-hw", "dali-inline", "torch")  # every kind of the GPU call, and the baseline
    assert set(json.loads((tmp_path / "loader-dry.json").read_text())["img_per_s"]) == {
        "baseline", *(k + s for k in kinds for s in ("", ", prepared 64px", ", prepared 32px"))}
    assert json.loads((tmp_path / "throughput-distill-dry.json").read_text())["distill"]["img_per_s"]["replay"] > 0
    deit3 = json.loads((tmp_path / "throughput-step-deit3-dry.json").read_text())["model"]
    assert [r["img_size"] for r in deit3] == [24, 32]  # the pre-training and the fine-tuning size
    three = json.loads((tmp_path / "loader-deit3-dry.json").read_text())
    suffix = load("loader").THREE
    assert set(three["img_per_s"]) == {"baseline" + suffix, "dali" + suffix, "torch" + suffix}
    e2e = json.loads((tmp_path / "e2e-dry.json").read_text())  # the real commands, end to end
    assert e2e["e2e"]["exit_code"] in (0, 3) and e2e["e2e"]["train_img_s"] > 0 and e2e["step_only"]["train_img_s"] > 0
    assert set(e2e["phases"]) == {"make_data", "prepare_data", "cache_teacher"} and "WORK" in e2e["command_train"]
    candidates = json.loads((tmp_path / "candidates-dry.json").read_text())
    assert [r["variant"] for r in candidates["rows"]] == ["ti:8:none", "ti:16:none:2"]
    assert candidates["rows"][1]["accum"] == 2
    assert all(r["train_img_s"] > 0 for r in candidates["rows"]) and candidates["rows"][0]["top_kernels"]


def test_the_gpu_windows_budgets_fit_a_session():
    """The header's plan: the calls in order, the product first (after the two that carry DALI),
    the fast GPU tests right after it and the slow compile modes after everything else; each
    window's budgets, with 90 s for the machine's start, fit a session's 900 s of device time;
    and every part named exists in the script."""
    import re

    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    rows = [m.groups() for m in re.finditer(r"^#\s+(\d+)\.\s+(\S+)\s+(\d)\s+(\d+)\s", script, re.M)]
    parts = [part for _, part, _, _ in rows]
    assert [int(n) for n, *_ in rows] == list(range(1, len(rows) + 1))
    assert parts[:4] == ["carry", "carry", "e2e", "tests"] and parts.index("tests-slow") > parts.index("candidates")
    for window in {w for _, _, w, _ in rows}:
        assert 90 + sum(int(t) for _, _, w, t in rows if w == window) <= 900, window
    assert all(re.search(rf"^\s+([a-z0-9-]+\|)*{part}(\|[a-z0-9-]+)*\)", script, re.M) for part in set(parts)), parts


@pytest.mark.slow
def test_the_soak_kills_and_resumes_a_training_that_ends_as_its_reference(tmp_path):
    """benchmarks/soak.py at toy size: a training of 6 updates killed (SIGKILL or SIGTERM, to the
    launcher or its group; within the start-up, so that every kill lands however fast the
    machine is) and resumed until the kills are spent; the results file holds the kills and no
    difference."""
    out = tmp_path / "soak.json"
    rc = load("soak").main(["--kills", "3", "--startup-share", "1", "--seed", "531", "--scenarios", "train",
                            "--images", "16", "--epochs", "2", "--work", str(tmp_path / "work"), "--results", str(out)])
    report = json.loads(out.read_text())
    train = report["scenarios"]["train"]
    assert rc == 0 and report["result"].endswith(" survived exactly, 0 differences"), report
    assert len(train["kills"]) >= 1 and train["restarts"] <= len(train["kills"])  # a late kill may find it done
    assert train["differences"] == train["defects"] == [] and train["max_abs_weight_difference"] == 0.0
    assert train["steps"] == 6 and report["versions"]["torch"] and report["command"].startswith("benchmarks/soak.py")


def test_the_loop_benchmark_times_the_trainer_loop_by_part(tmp_path):
    """benchmarks/loop.py at toy size: every target source it times runs the real Trainer loop
    (a metrics line per step written, the cache's rows read), each size at the same steps."""
    out = tmp_path / "loop.json"
    rc = load("loop").main(["--batch", "128", "--steps", "2", "--repeats", "1", "--sizes", "1,2", "--log-every", "1",
                            "--targets", "none,replay,labelmap", "--tail", "gpu,cpu", "--root", str(tmp_path / "data"),
                            "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and len(rows) == 2 * 3 * 2
    assert [r["train_images"] for r in rows[::6]] == [256, 512]  # the data set grows, the timed steps do not
    for r in rows:
        parts = r["profile_ms_per_step"]
        assert r["host_ms_per_step"] > 0 and r["update_ms"] > 0 and r["host_only_ms_per_step"] > 0
        assert parts["log_step (sync, all-reduce, metrics line)"] > 0
        assert (r["targets"] == "none") == ("targets: host (cache rows, pooling inputs)" not in parts)
        assert parts["prepare: apply_tail"] > 0 and r["prepare_operator_calls"] > 50  # the tail runs in the step


def test_the_startup_benchmark_times_each_start_and_the_real_command(tmp_path):
    """benchmarks/startup.py at toy size: every start in a fresh process, `fastdeit train`
    itself to its first metrics line (in its own process group, then stopped), a prepared set."""
    out = tmp_path / "startup.json"
    rc = load("startup").main(["--files", "2000", "--small", "0", "--val-files", "1000", "--seed-px", "16,24",
                               "--repeats", "1", "--img-size", "32", "--root", str(tmp_path / "trees"),
                               "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["files"] == {"2000": 3000}
    for start in ("first scan (every header read)", "start with the stored index",
                  "fastdeit train to its first step, with the stored index",
                  "fastdeit train to its first step, prepared data set"):
        assert report["results"][start]["seconds"]["3000"] > 0, start


def test_the_cache_rows_benchmark_times_each_layout(tmp_path):
    """benchmarks/cache_rows.py at toy size: both shard layouts written by the real writer,
    looked up by the real reader, with the shards each batch touched."""
    out = tmp_path / "rows.json"
    rc = load("cache_rows").main(["--rows", "300", "--batches", "64", "--shard-rows", "16,labelmap", "--draws", "3",
                                  "--root", str(tmp_path), "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shard_rows"], r["shards"]) for r in rows] == [(16, 19), (rows[1]["shard_rows"], 1)]
    assert rows[0]["shards_touched"] > 1 and rows[1]["shards_touched"] == 1
    assert all(r["ms_per_batch"] > 0 for r in rows)
    assert not list(tmp_path.glob("fastdeit-cache-rows-*"))  # the caches are removed
