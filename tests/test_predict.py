"""fastdeit predict: the class names of the run, the eval transform, every head."""

import json

from typer.testing import CliRunner

from fastdeit.cli.commands import app

from tiny import TINY_MODEL, TINY_RUN

runner = CliRunner()


def test_predict_agrees_with_eval_on_the_val_images(tiny_data, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model",
                              "deit_tiny_distilled", "--out", str(run), "--epochs", "3", "--distill", "none"])
    assert res.exit_code == 0, res.output
    ev = runner.invoke(app, ["eval", "--data", str(tiny_data), "--ckpt", str(run / "checkpoint-last.pt"),
                             "--workers", "0", "--loader", "torch", "--head", "cls"])
    top1 = json.loads(ev.stdout.strip().splitlines()[-1])["top1"]
    folder = runner.invoke(app, ["eval", "--data", str(tiny_data), "--ckpt", str(run), "--workers", "0", "--loader",
                                 "torch"])  # a run folder: its best checkpoint, as predict reads it
    assert folder.exit_code == 0, folder.output
    best = json.loads((run / "summary.json").read_text())["best_top1"]
    assert abs(json.loads(folder.stdout.strip().splitlines()[-1])["top1"] - best) < 1e-6
    res = runner.invoke(app, ["predict", str(tiny_data / "val"), "--weights", str(run / "checkpoint-last.pt"),
                              "--head", "cls", "--topk", "2"])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(records) == len(list((tiny_data / "val").rglob("*.jpg")))
    right = [r["top"][0][0] == r["image"].split("/")[-2] for r in records]  # the class folder is the label
    assert abs(100 * sum(right) / len(right) - top1) < 1e-6
    assert all(len(r["top"]) == 2 and r["top"][0][1] >= r["top"][1][1] for r in records)
    one = runner.invoke(app, ["predict", records[0]["image"], "--weights", str(run), "--head", "cls", "--topk", "2"])
    assert json.loads(one.stdout)["image"] == records[0]["image"]  # a run folder: its best checkpoint


def test_unreadable_images_are_named_and_bad_arguments_are_one_line(tiny_data, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny",
                              "--out", str(run)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["predict", str(bad), "--weights", str(run)])
    assert res.exit_code == 0 and json.loads(res.stdout)["error"] == "cannot be read as an image"
    for args, words in ((["predict", str(bad), "--weights", str(run), "--head", "dist"], "only the joint head"),
                        (["predict", str(tmp_path / "none.jpg"), "--weights", str(run)], "does not exist"),
                        (["predict", str(bad), "--weights", str(tmp_path)], "holds no checkpoint"),
                        # a checkpoint names its model: another --model is refused, never silently ignored
                        (["predict", str(bad), "--weights", str(run), "--model", "deit_small"],
                         "is a fastdeit checkpoint of deit_tiny, not deit_small: drop --model"),
                        (["eval", "--data", str(tiny_data), "--ckpt", str(run), "--model", "deit_small"],
                         "not deit_small: drop --model")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and words in res.stderr and "Traceback" not in res.output, res.output
    same = runner.invoke(app, ["predict", str(bad), "--weights", str(run), "--model", "deit_tiny_patch16_224"])
    assert same.exit_code == 0, same.output  # the same model by timm's name
