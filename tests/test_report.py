"""fastdeit report: the figures hold each run's series, for runs resumed, cut or unevaluated."""

import json

import pytest
from typer.testing import CliRunner

from fastdeit.cli import app
from fastdeit.report import figure_data, read_run, write_report

from tiny import TINY_MODEL, TINY_RUN

pytest.importorskip("matplotlib")
runner = CliRunner()
RUN = [*TINY_RUN, *TINY_MODEL, "--set", "run.log_every=1"]


def train(tiny_data, out, *extra) -> None:
    res = runner.invoke(app, ["train", *RUN, "--data", str(tiny_data), "--out", str(out), *extra])
    assert res.exit_code == 0, res.output


def test_report_of_a_plain_a_resumed_and_a_cut_run(tiny_data, tmp_path):
    plain, resumed, cut = tmp_path / "plain", tmp_path / "resumed", tmp_path / "cut"
    train(tiny_data, plain, "--model", "deit_tiny_distilled", "--epochs", "2")
    train(tiny_data, resumed, "--model", "deit_tiny", "--epochs", "1")
    train(tiny_data, resumed, "--model", "deit_tiny", "--epochs", "2", "--resume", "auto")
    train(tiny_data, cut, "--model", "deit_tiny", "--epochs", "1")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    steps_only = [x for x in lines if '"kind": "step"' in x][:2]
    (cut / "metrics.jsonl").write_text("\n".join(steps_only) + '\n{"kind": "step", "epo')  # cut mid-line

    out = tmp_path / "r" / "report.html"
    out.parent.mkdir()
    res = runner.invoke(app, ["report", str(plain), str(resumed), str(cut), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert page.count("data:image/png;base64,") == len(json.loads(res.stdout)["figures"]) >= 5
    assert "not whole" in res.stderr and "no evaluation yet" in res.stderr
    runs = [read_run(p) for p in (plain, resumed, cut)]
    figs = figure_data(runs)
    assert set(figs["loss"]) == {"plain", "resumed", "cut"}
    assert len(figs["loss"]["plain"]["loss"][0]) == 8 and len(figs["loss"]["cut"]["loss"][0]) == 2
    assert figs["loss"]["resumed"]["loss"][0] == list(range(1, 9))  # each update once, after the resume too
    assert len(figs["top1"]["plain"]["joint"][0]) == 2 and set(figs["top1"]["plain"]) == {"joint", "cls", "dist"}
    assert set(figs["top1"]["resumed"]) == {"joint"} and "cut" not in figs["top1"]
    assert "loss_distill" not in json.dumps(figs["loss"]["resumed"])  # no distillation, no such series


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "is not a run folder" in res.stderr and "Traceback" not in res.output
    with pytest.raises(Exception, match="not a run folder"):
        write_report([tmp_path], tmp_path / "x.html")


def test_tensorboard_event_files_hold_the_logged_scalars(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train(tiny_data, run, "--model", "deit_tiny", "--epochs", "2", "--log", "tensorboard")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    data = read_run(run)
    loss = [(e.step, e.value) for e in events.Scalars("step/loss")]
    assert loss == [(u, pytest.approx(r["loss"], rel=1e-6)) for u, r in sorted(data.steps.items())]
    top1 = [(e.step, e.value) for e in events.Scalars("epoch/top1")]
    assert top1 == [(e + 1, pytest.approx(r["top1"], rel=1e-6)) for e, r in sorted(data.epochs.items())]


def test_a_missing_logging_package_is_one_line(tiny_data, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    res = runner.invoke(app, ["train", *RUN, "--data", str(tiny_data), "--out", str(tmp_path / "w"), "--log", "wandb"])
    assert res.exit_code == 2 and "pip install wandb" in res.stderr and not (tmp_path / "w").exists()


def fake_run(path):
    """A run folder as report reads it: two logged steps, one evaluated epoch."""
    path.mkdir(parents=True)
    recs = [{"kind": "step", "updates": u, "loss": 2.0 - u / 10, "lr": 1e-3} for u in (1, 2)]
    recs.append({"kind": "epoch", "epoch": 0, "top1": 40.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_report_writes_over_its_own_report_only(tmp_path):
    run = fake_run(tmp_path / "run")
    ckpt = run / "checkpoint-last.pt"
    ckpt.write_bytes(b"PK\x03\x04 weights")
    args = ["report", str(run), "--out"]
    res = runner.invoke(app, [*args, str(ckpt)])
    assert res.exit_code == 2 and "not a report fastdeit wrote" in res.stderr and "Traceback" not in res.output
    assert ckpt.read_bytes() == b"PK\x03\x04 weights" and not (run / "checkpoint-last-figures").exists()
    res = runner.invoke(app, [*args, str(run)])  # a folder
    assert res.exit_code == 2 and "is a folder" in res.stderr

    out = tmp_path / "r.html"
    for _ in range(2):  # its own page and figures are written again
        res = runner.invoke(app, [*args, str(out)])
        assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["pngs"]) == 3

    mine = tmp_path / "mine.html"
    (tmp_path / "mine-figures").mkdir()
    (tmp_path / "mine-figures" / "loss.png").write_bytes(b"a figure of mine")
    res = runner.invoke(app, [*args, str(mine)])
    assert res.exit_code == 2 and "mine-figures" in res.stderr and "loss.png" in res.stderr
    assert (tmp_path / "mine-figures" / "loss.png").read_bytes() == b"a figure of mine" and not mine.exists()
