"""fastdeit report: the figures hold each run's series, for runs resumed, cut or unevaluated;
a sweep of runs stays readable, in a real browser too."""

import html
import json

import pytest
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.report.run_report import figure_data, read_run, write_report

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
    assert page.count("data-figure=") == len(json.loads(res.stdout)["figures"]) >= 5
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


def test_without_plotly_the_page_embeds_the_pngs(tmp_path, monkeypatch):
    import fastdeit.report.page

    monkeypatch.setattr(fastdeit.report.page, "_has_plotly", lambda: False)
    result = write_report([fake_run(tmp_path / "run")], tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == len(result["figures"]) == 3 and "plotly is not installed" in page
    assert "Plotly.newPlot" not in page and 'class="run"' in page  # the run bar stays, as a legend


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


# The arms of benchmarks/ablation.py --quick, and one more: a sweep's worth of runs.
SWEEP = ["none", "soft", "hard", "hard-replay", "hard-labelmap", "hard-convnet-matched", "hard-transformer",
         "none-10pct", "hard-10pct", "none-30pct", "hard-30pct", "hard-seed1"]


def sweep_run(path, k: int, steps: int = 60, epochs: int = 3):
    """A run folder as a short training writes it, with noisy step curves that differ per run;
    runs without distillation (the "none" arms) log no distillation loss nor extra heads."""
    import math
    import random

    rng, distilled = random.Random(k), not path.name.startswith("none")
    path.mkdir(parents=True)
    recs = []
    for u in range(1, steps + 1):
        base = 4.6 * math.exp(-u / (25 + 3 * k)) + 1.0 + rng.gauss(0, 0.15)
        peak = 5e-4 * (1 + k % 3)  # a learning-rate sweep: warmup, then cosine
        lr = peak * min(1.0, u / 10) * (0.5 + 0.5 * math.cos(math.pi * max(0, u - 10) / (steps - 10)))
        rec = {"kind": "step", "updates": u, "loss_base": base, "lr": lr,
               "img_s": 900 + 40 * k + rng.gauss(0, 60), "data_wait": max(0.0, 0.1 + rng.gauss(0, 0.05))}
        if distilled:
            rec["loss_distill"] = base * 0.8 + rng.gauss(0, 0.1)
        rec["loss"] = (base + rec.get("loss_distill", base)) / 2
        recs.append(rec)
    for e in range(epochs):
        top1 = 20 + 8 * e + 1.5 * k
        heads = {"top1_cls": top1 - 2, "top1_dist": top1 - 1} if distilled else {}
        recs.append({"kind": "epoch", "epoch": e, "top1": top1, "top5": top1 + 30, "train_img_s": 900 + 40 * k,
                     **heads})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    mode = path.name.split("-")[0]
    targets = next((t for t in ("replay", "labelmap") if t in path.name), "live")
    model = "deit_tiny" if mode == "none" else "deit_tiny_distilled"
    config = {"model": {"name": model}, "distill": {"mode": mode, "targets": targets}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "summary.json").write_text(json.dumps({"wall_s": 60.0 + 5 * k}))
    return path


def sweep(root, n: int = 12) -> list:
    names = SWEEP + [f"run-{k}" for k in range(len(SWEEP), n)]
    return [sweep_run(root / names[k], k) for k in range(n)]


def test_a_sweep_has_one_colour_per_run_in_every_figure_and_smoothed_steps(tmp_path):
    pytest.importorskip("plotly")
    from PIL import Image

    from fastdeit.report.page import ema, plotly_figure, run_styles
    from fastdeit.report.run_report import specs

    runs = sweep(tmp_path / "runs", 12)
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", *map(str, runs), "--out", str(out), "--smooth", "0.8"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert len({s.colour for s in run_styles([f"r{k}" for k in range(24)]).values()}) == 24  # no colour twice
    assert len(set(run_styles([f"r{k}" for k in range(72)]).values())) == 72  # then another dash
    styles = run_styles([r.name for r in runs])
    figures = figure_data([read_run(r) for r in runs])
    page = out.read_text()
    assert page.count('id="plotly-js"') == 1 and page.count("plotly.js v") == 1  # the library once, inline
    assert '<meta name="generator" content="fastdeit report">' in page[:512] and "cdn" not in page[:2000].lower()
    assert page.count('class="run"') == 12 and "<img" not in page
    for name, data in figures.items():
        fig = plotly_figure(data, specs()[name], styles, 0.8)
        for t in fig.data:  # the run's colour, whatever the figure
            assert t.line.color == styles[t.legendgroup].colour
        lines = [t for t in fig.data if t.meta != "raw"]
        per_panel = {}
        for t in lines:
            per_panel.setdefault(t.xaxis, []).append(t.legendgroup)
        assert all(len(v) == len(set(v)) <= 12 for v in per_panel.values())  # one line per run per panel
        smoothed = [t for t in fig.data if t.meta == "smoothed"]
        assert bool(smoothed) == (name in ("loss", "speed", "data_wait"))
        for t in smoothed:
            assert list(t.y) == pytest.approx(ema(list(t.customdata), 0.8))
    loss = plotly_figure(figures["loss"], specs()["loss"], styles, 0.8)
    assert {a.text for a in loss.layout.annotations} == {"loss", "base", "distillation"}  # small multiples
    assert len({t.legendgroup for t in loss.data if t.meta == "raw"}) == 12  # raw points still drawn
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0]) and ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert str(ema([1.0, float("nan"), 1.0], 0.5)) == "[1.0, nan, 1.0]"  # a diverged point passes, the rest stays
    assert len(result["pngs"]) == 6  # no cached targets: no agreement figure
    for png in result["pngs"]:  # the PNGs stay, marked as ours
        with Image.open(png) as img:
            assert img.info.get("Software") == "fastdeit report" and img.width >= 800

    res = runner.invoke(app, ["report", str(runs[0]), "--out", str(out), "--smooth", "1"])
    assert res.exit_code == 2 and "--smooth" in res.stderr and "Traceback" not in res.output


# Run in the page once it has drawn: hide the first run (its button), then smoothing off (the
# slider), and leave what the browser drew in <pre id="check"> for --dump-dom to hand back.
_PROBE = """<script>
window.addEventListener('load', () => setTimeout(() => {
  const lines = () => document.querySelectorAll('path.js-line').length;
  const out = {plots: document.querySelectorAll('.js-plotly-plot .main-svg').length, lines: lines()};
  document.querySelector('button.run').click();
  setTimeout(() => {
    out.hidden = lines();
    const s = document.getElementById('smooth');
    s.value = 0;
    s.dispatchEvent(new Event('input'));
    setTimeout(() => {
      const t = document.querySelector('[data-figure="loss"] .js-plotly-plot').data.filter(t => t.meta === 'smoothed');
      out.raw = t.every(t => Array.from(t.y).every((y, i) => Math.abs(y - t.customdata[i]) < 1e-9));
      const pre = document.createElement('pre');
      pre.id = 'check';
      pre.textContent = JSON.stringify(out);
      document.body.appendChild(pre);
    }, 300);
  }, 300);
}, 500));
</script>"""


def chromium(*args: str) -> str:
    """Headless Chromium's stdout (root needs --no-sandbox; virtual time lets timers run at once)."""
    import shutil
    import subprocess
    import tempfile

    exe = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome"))), None)
    if exe is None:
        pytest.skip("no Chromium here (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                              f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_the_page_draws_in_a_headless_browser(tmp_path):
    """The page as a user opens it, offline: every figure drawn with a line per run and panel,
    a run hidden across figures by its button, the slider smoothing, each run's colour on screen."""
    pytest.importorskip("plotly")
    import re

    import numpy as np
    from PIL import Image

    from fastdeit.report.page import plotly_figure, run_styles
    from fastdeit.report.run_report import specs

    runs = sweep(tmp_path / "runs", 12)
    out = tmp_path / "report.html"
    result = write_report(runs, out)
    styles = run_styles([r.name for r in runs])
    figs = [plotly_figure(d, specs()[n], styles, 0.6) for n, d in result["figures"].items()]
    first = sum(t.legendgroup == runs[0].name for f in figs for t in f.data)

    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text().replace("</body>", _PROBE + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri())
    check = json.loads(html.unescape(re.search(r'<pre id="check">(.*?)</pre>', dom).group(1)))
    assert check["plots"] >= len(figs) == 6
    assert check["lines"] == sum(len(f.data) for f in figs)  # every trace drawn
    assert check["hidden"] == check["lines"] - first and check["raw"]

    shot = tmp_path / "shot.png"
    chromium("--window-size=1600,2600", f"--screenshot={shot}", out.as_uri())
    rgb = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(np.int64)
    packed, counts = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2], return_counts=True)
    colours = np.stack([packed >> 16, packed >> 8 & 255, packed & 255], axis=1)
    assert len(packed) > 200  # not a blank page
    for name, colour in result["colours"].items():  # each run's line on screen, in its own colour
        near = np.abs(colours - [int(colour[i:i + 2], 16) for i in (1, 3, 5)]).sum(axis=1) < 12
        assert counts[near].sum() > 300, name


def test_bad_lines_in_metrics_are_noted_and_left_out(tmp_path):
    """One bad line crashed the whole report (non-UTF-8 bytes, a value that is not an object, an
    epoch record without its fields), and a junk value hid the real top-1 of its epoch."""
    run = sweep_run(tmp_path / "none-a", 0, epochs=3)
    good = (run / "metrics.jsonl").read_bytes()
    junk = [b"\xff\xfe not text", b"[1, 2]", b'{"kind": "epoch", "top1": 50}',
            b'{"kind": "epoch", "epoch": 2, "top1": "junk"}', b'{"kind": "step", "updates": "x"}',
            b'{"kind": "epoch", "epoch": 1, "top1": NaN}']
    (run / "metrics.jsonl").write_bytes(good + b"\n".join(junk) + b"\n")
    (run / "summary.json").write_text("[]")
    first = len(good.splitlines()) + 1
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    data = read_run(run)
    assert data.notes == [
        f"line {first} of metrics.jsonl is not UTF-8 text: left out",
        f"line {first + 1} of metrics.jsonl is not a record but list: left out",
        f"line {first + 2} of metrics.jsonl is an epoch record with epoch = None: left out",
        f"line {first + 3} of metrics.jsonl has top1 = 'junk', not a number: left out",
        f"line {first + 4} of metrics.jsonl has updates = 'x', not a count: left out",
        f"line {first + 5} of metrics.jsonl has top1 = nan, not a number: left out",
        "summary.json is not a JSON object: left out"]
    assert data.series("epoch", "top1")[1] == [20.0, 28.0, 36.0]  # the real values, none hidden
    assert "not UTF-8 text" in (tmp_path / "r.html").read_text()
