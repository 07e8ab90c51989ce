"""The benchmark scripts run (tiny settings): they must not rot. Speed is not asserted here."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loader_benchmark_runs_and_writes_json(tiny_data, tmp_path):
    out = tmp_path / "loader.json"
    rc = load("loader").main(["--data", str(tiny_data), "--device", "cpu", "--workers", "1", "--batch-size", "8",
                              "--img-size", "32", "--steps", "2", "--warmup", "1", "--repeats", "1",
                              "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["device"] and report["versions"]["torch"]
    assert set(report["img_per_s"]) >= {"torch", "baseline"} and all(v > 0 for v in report["img_per_s"].values())
    assert "torch/baseline" in report["ratios"]


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
    rc = load("throughput").main(["--device", "cpu", "--models", "deit_tiny_distilled", "--img-size", "32",
                                  "--patch-size", "8", "--batch-sizes", "4", "--compile", "none", "--quick",
                                  "--out", str(out)])
    rows = json.loads(out.read_text())["model"]
    assert rc == 0 and len(rows) == 1 and "error" not in rows[0]
    assert rows[0]["train_img_s"] > 0 and rows[0]["forward_gmacs"] > 0 and rows[0]["mfu"] is None
