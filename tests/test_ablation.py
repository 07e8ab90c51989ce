"""benchmarks/ablation.py end to end at its tiny scale: the runs, the statistics, the
figures, and a study stopped and started again."""

import json
import shutil
import statistics

import pytest

from fastdeit.errors import UserError

from tiny import ROOT, load_benchmark

ARMS = "none,hard,hard-replay,hard-transformer,hard-10pct,deit3,deit3-hard"


def rec_of(report: dict, arm: str) -> dict:
    return next(r for r in report["runs"] if r["arm"] == arm)["settings"]


def test_the_study_runs_aggregates_and_resumes(tmp_path, monkeypatch):
    ablation = load_benchmark("ablation")
    out = tmp_path / "study"
    args = ["--tiny", "--seeds", "2", "--out", str(out), "--arms", ARMS]
    report = ablation.main(args)

    want = {(a, s) for a in ARMS.split(",") for s in (0, 1)} - {("hard-replay", 1)}  # replay: one seed
    assert {(r["arm"], r["seed"]) for r in report["runs"]} == want
    assert set(report["teachers"]) == {"convnet", "transformer"}  # the matched convnet is not needed here
    for arm, stats in report["arms"].items():
        joint = [r["top1_joint"] for r in report["runs"] if r["arm"] == arm]
        assert stats["joint"]["mean"] == pytest.approx(statistics.fmean(joint))
        assert stats["joint"]["n"] == len(joint) == (1 if arm == "hard-replay" else 2)
        assert stats["joint"]["std"] == (pytest.approx(statistics.stdev(joint)) if len(joint) > 1 else None)
        assert ("cls" in stats) == (arm not in ("none", "deit3"))  # deit_tiny and deit3 have one head
    # Replayed targets are the live teacher's: the same student.
    top1 = {(r["arm"], r["seed"], h): r[f"top1_{h}"] for r in report["runs"] for h in ("cls", "dist", "joint")
            if f"top1_{h}" in r}
    assert all(top1["hard", 0, h] == top1["hard-replay", 0, h] for h in ablation.HEADS)
    claims = {c["claim"]: c for c in report["comparisons"]}
    same = claims["replayed targets train as the live teacher"]
    assert same["diffs"] == [0.0] and same["kind"] == "same" and same["seeds_for"] == 1  # a claim of equality
    hard_none = claims["distillation helps: hard vs none"]
    assert hard_none["diffs"] == [top1["hard", s, "joint"] - top1["none", s, "joint"] for s in (0, 1)]
    assert hard_none["mean"] == pytest.approx(statistics.fmean(hard_none["diffs"]))
    assert hard_none["seeds_for"] == sum(d > 0 for d in hard_none["diffs"])
    assert report["compute_wall_s"] == pytest.approx(sum(r["wall_s"] for r in [*report["runs"],
                                                                               *report["teachers"].values()]))
    # The 10% arm trained on 10% of the images: one per class at this scale, the val split whole.
    sub = out / "data" / "train-10pct"
    assert sum(1 for _ in (sub / "train").rglob("*.jpg")) == 10
    assert sum(1 for _ in (sub / "val").rglob("*.jpg")) == sum(1 for _ in (out / "data/full/val").rglob("*.jpg"))
    # ... for ten times the epochs (as many updates as on all of them), warm-up and evaluations alike.
    rec = next(r for r in report["runs"] if r["arm"] == "hard-10pct")
    assert rec["settings"]["sched"]["epochs"] == 10 * ablation.TINY.student_epochs
    full = rec_of(report, "hard")
    assert rec["settings"]["sched"]["warmup_epochs"] == pytest.approx(10 * full["sched"]["warmup_epochs"])
    assert rec["settings"]["run"]["eval_every"] == 10 * full["run"]["eval_every"]
    # DeiT III's arms train its recipe: a LayerScale student without a teacher, and distilled.
    deit3 = rec_of(report, "deit3")
    assert deit3["model"]["name"] == "deit3_small" and deit3["distill"]["base_loss"] == "bce"
    assert deit3["aug"]["three_augment"] and deit3["optim"]["opt"] == "lamb" and not deit3["optim"]["scale_lr"]
    assert rec_of(report, "deit3-hard")["distill"]["mode"] == "hard"
    assert claims["DeiT III's recipe without a teacher beats DeiT's with one"]["diffs"] == [
        top1["deit3", s, "joint"] - top1["hard", s, "joint"] for s in (0, 1)]
    assert (out / "ablation-recipe.png").is_file()
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["arms"] == report["arms"] and saved["settings"]["seeds"] == 2
    for q in ("distillation", "teacher", "scarcity"):
        assert (out / f"ablation-{q}.png").stat().st_size > 0

    # Started again: nothing is trained again. With one run lost, only that one is.
    trained = []
    real_train = ablation.train_run
    monkeypatch.setattr(ablation, "train_run",
                        lambda cfg, *a, **k: trained.append(cfg.run.out) or real_train(cfg, *a, **k))
    assert ablation.main(args)["arms"] == report["arms"]
    assert trained == []
    (out / "records" / "hard-s1.json").unlink()
    shutil.rmtree(out / "runs" / "hard-s1")
    again = ablation.main(args)
    assert trained == [str(out / "runs" / "hard-s1")]
    # A record of other settings (the scarce arms trained at fixed epochs, say) is refused, not mixed in.
    record = out / "records" / "hard-10pct-s0.json"
    rec = json.loads(record.read_text())
    rec["settings"]["sched"]["epochs"] = ablation.TINY.student_epochs
    record.write_text(json.dumps(rec))
    with pytest.raises(UserError, match=r"hard-10pct-s0.json was trained with other settings \(sched.epochs 1 then, "
                                        r"10 now\): delete it and .*runs/hard-10pct-s0 to train it again"):
        ablation.main(args)
    heads = ablation.HEADS  # the accuracies again (the same machine trains deterministically), not the timings
    assert {h: again["arms"]["hard"][h] for h in heads} == {h: report["arms"]["hard"][h] for h in heads}


def test_an_unknown_arm_is_one_line(tmp_path):
    ablation = load_benchmark("ablation")
    with pytest.raises(UserError, match="unknown arm 'hardest'; choose from: none, soft"):
        ablation.main(["--tiny", "--out", str(tmp_path), "--arms", "hard,hardest"])


def test_the_results_page_shows_the_committed_study():
    """docs/results.md shows the two ablation tables of the committed results file, verbatim, as the
    report prints them."""
    report = load_benchmark("ablation_report")
    results = json.loads((ROOT / "benchmarks" / "results" / "ablation-cpu-2core.json").read_text())
    page = (ROOT / "docs" / "results.md").read_text()
    tables = report.markdown(results).split("\n\n")
    assert len(tables) == 2 and all(t.strip() in page for t in tables)
