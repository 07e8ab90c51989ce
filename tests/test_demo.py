import json

from rich.console import Console

from fastdeit.config.recipes import recipe
from fastdeit.config.schema import apply_overrides
from fastdeit.demo import DemoRun, demo_runs, run_config, run_demo

from tiny import TINY_SET

SMALL_VIT = ("model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8")


def test_demo_runs_are_valid_configs(tmp_path):
    runs = demo_runs()
    assert [(r.distill, r.targets) for r in runs] == [
        ("none", "live"), ("none", "live"), ("hard", "live"), ("hard", "replay"), ("hard", "labelmap")]
    cfgs = [run_config(recipe("demo"), r, tmp_path / "data", tmp_path / "out") for r in runs]
    assert cfgs[0].model.width == 0.5 and cfgs[2].distill.teacher_ckpt.endswith("teacher/checkpoint-last.pt")
    # label maps at the teacher's own scale (0: the training size)
    assert cfgs[3].distill.teacher_cache.endswith("teacher-replay") and cfgs[4].distill.labelmap_size == 0


def test_demo_end_to_end_on_tiny_settings(tmp_path):
    base = apply_overrides(recipe("demo"), ["data.img_size=32", "run.batch_size=16", "sched.epochs=1",
                                            "data.workers=0", "run.progress=false"])
    runs = [DemoRun("teacher", "resnet10t"), DemoRun("deit_tiny", "deit_tiny", sets=SMALL_VIT),
            DemoRun("deit_tiny_distilled", "deit_tiny_distilled", distill="hard", sets=SMALL_VIT),
            DemoRun("replay", "deit_tiny_distilled", distill="hard", targets="replay", sets=SMALL_VIT),
            DemoRun("labelmap", "deit_tiny_distilled", distill="hard", targets="labelmap", sets=SMALL_VIT)]
    with open(tmp_path / "log.txt", "w") as log:
        console = Console(file=log)
        rows = run_demo(tmp_path / "out", tmp_path / "data", console, base=base, runs=runs, synthetic=TINY_SET)
        heads = [("deit_tiny_distilled", t, h) for t in ("live", "replay", "labelmap")
                 for h in ("cls", "dist", "joint")]
        assert [(r["model"], r["targets"], r["head"]) for r in rows] == [
            ("resnet10t", "", "joint"), ("deit_tiny", "", "joint"), *heads]
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["rows"] == rows and set(summary["runs"]) == {r.folder for r in runs}
        assert (tmp_path / "out" / "teacher-replay" / "manifest.json").exists()
        assert (tmp_path / "out" / "teacher-labelmap" / "manifest.json").exists()
        for r in rows:
            run = summary["runs"][r["run"]]
            assert r["top1"] == (run["top1"] if r["head"] == "joint" else run[f"top1_{r['head']}"])
        page = (tmp_path / "out" / "report.html").read_text()  # every run's curves on one page
        assert all(f"{r.folder}</td>" in page for r in runs) and 'data-figure="' in page  # (plotly, or PNGs)
        # a second demo reuses the data and replaces its own earlier runs
        run_demo(tmp_path / "out", tmp_path / "data", console, base=base, runs=runs[:1], synthetic=TINY_SET)
    log_text = (tmp_path / "log.txt").read_text()
    assert "data: reusing" in log_text and "replacing the earlier demo run" in log_text
