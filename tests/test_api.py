"""The Python API: the README's example runs as printed (on a tiny data set standing in for
`fastdeit make-data demo-data`), and bad input raises UserError instead of exiting."""

import os
import re
import shutil

import pytest
import torch

from fastdeit.errors import UserError

from tiny import ROOT, TINY_MODEL


def test_the_readmes_python_example_runs(tiny_data, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"\*\*From Python\*\*.*?```python\n(.*?)```", readme, re.S).group(1)
    shutil.copytree(tiny_data, tmp_path / "demo-data")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the README's own example
    assert scope["summary"]["top1"] is not None and (tmp_path / "runs" / "api" / "summary.json").exists()
    assert scope["scores"]["joint"]["top1"] == pytest.approx(scope["summary"]["top1"])
    model = scope["model"]
    assert isinstance(model, torch.nn.Module) and not model.training and len(model.fastdeit_classes) == 3
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_bad_input_raises_user_error(tiny_data, tmp_path):
    import fastdeit

    with pytest.raises(UserError, match="unknown setting 'batchsize'"):
        fastdeit.config_from("demo", data=str(tiny_data), out=str(tmp_path / "r"), batchsize=16)
    with pytest.raises(UserError, match="data=DIR is required"):
        fastdeit.config_from("demo", out=str(tmp_path / "r"))
    with pytest.raises(UserError, match="unknown recipe|recipe"):
        fastdeit.config_from("nope", data=str(tiny_data), out=str(tmp_path / "r"))


def test_a_wrong_type_or_value_is_a_user_error_naming_the_setting(tiny_data, tmp_path):
    """Settings are converted as --set values are (a string of digits is a number); anything
    else, and evaluate's bad arguments, raise UserError before any work (no TypeError)."""
    import fastdeit

    base = {"data": tiny_data, "out": tmp_path / "r"}  # paths as Path objects too
    cfg = fastdeit.config_from("demo", **base, batch_size="32", epochs=2.0, sets="run.seed=3")
    assert (cfg.run.batch_size, cfg.sched.epochs, cfg.run.seed, cfg.data.path) == (32, 2, 3, str(tiny_data))
    for bad, words in (({"batch_size": "abc"}, "batch_size must be an integer, got 'abc'"),
                       ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
                       ({"lr": "fast"}, "lr must be a number, got 'fast'"),
                       ({"distill": "bogus"}, "distill must be one of none, soft, hard")):
        with pytest.raises(UserError, match=re.escape(words)):
            fastdeit.config_from("demo", **base, **bad)
    with pytest.raises(UserError, match="train takes a TrainConfig, got str"):
        fastdeit.train("demo")
    for bad, words in (({"workers": -1}, "workers must be >= 0"), ({"device": "gpu"}, "device must be one of"),
                       ({"loader": "fast"}, "loader must be one of"), ({"batch_size": 0}, "batch_size must be")):
        with pytest.raises(UserError, match=f"^{re.escape(words)}"):
            fastdeit.evaluate(tmp_path / "none.pt", tiny_data, **bad)  # checked before the weights are read


def test_errors_name_the_arguments_given_not_flags_or_their_keys(tiny_data, tmp_path):
    """A Python caller never typed --batch-size: the error names batch_size; a key set through
    sets= stays the key it was given as."""
    import fastdeit

    base = {"data": tiny_data, "out": tmp_path / "r"}
    with pytest.raises(UserError, match=r"^batch_size must be >= 1, got 0$"):
        fastdeit.config_from("demo", **base, batch_size=0)
    with pytest.raises(UserError, match=r"^run\.batch_size must be >= 1, got 0$"):
        fastdeit.config_from("demo", **base, sets=["run.batch_size=0"])
    with pytest.raises(UserError, match=r"^out=RUN is required"):
        fastdeit.config_from("demo", data=tiny_data)
    with pytest.raises(UserError, match=r"pass data=DIR \(make one with: fastdeit make-data DIR\)$"):
        fastdeit.evaluate(tmp_path / "none.pt", tmp_path / "nowhere")


def test_arguments_of_the_wrong_type_are_one_user_error_naming_them(tiny_data, tmp_path):
    """What a notebook sends by mistake (None, a number for a path, a word for a number, a bad
    sets= item) is a UserError naming the argument before any work, never a TypeError; an
    integer as a string of digits is taken, as --set takes it; --set in a message reads sets=."""
    import fastdeit

    base = {"data": tiny_data, "out": tmp_path / "r"}
    cfg = fastdeit.config_from("demo", **base)
    for call, words in ((lambda: fastdeit.config_from("demo", **base, sets=None), "sets must be a list"),
                        (lambda: fastdeit.config_from("demo", **base, sets=[5]), "sets must be a list"),
                        (lambda: fastdeit.config_from("demo", **base, config=5), "config must be a path"),
                        (lambda: fastdeit.config_from("demo", **base, sets=["nosec.x=1"]),
                         "unknown config section 'nosec' in sets=['nosec.x=1']"),
                        (lambda: fastdeit.evaluate(tmp_path / "r", None),
                         "data must be a path (str or Path), got None"),
                        (lambda: fastdeit.evaluate(tmp_path / "r", tiny_data, batch_size="x"),
                         "batch_size must be an integer, got 'x'"),
                        (lambda: fastdeit.evaluate(tmp_path / "r", tiny_data, ema="yes"), "ema must be True or False"),
                        (lambda: fastdeit.evaluate(tmp_path / "r", tiny_data, bogus=1),
                         "evaluate: got an unexpected keyword argument 'bogus'"),
                        (lambda: fastdeit.load(tmp_path / "r", img_size=None), "img_size must be an integer"),
                        (lambda: fastdeit.train(cfg, gpus="two"), "gpus must be an integer, got 'two'"),
                        (lambda: fastdeit.train(cfg, gpus=0, procs="two"), "procs must be an integer")):
        with pytest.raises(UserError, match=re.escape(words)):
            call()
    with pytest.raises(UserError, match=re.escape("weights file")):  # "16" was taken as 16: the weights are next
        fastdeit.evaluate(tmp_path / "none.pt", tiny_data, batch_size="16")


def test_a_stop_in_python_says_how_python_continues(tiny_data, tmp_path):
    """SIGTERM during fastdeit.train raises fastdeit.errors.Stopped once the checkpoint is saved,
    worded for a Python caller (it said "continue with --resume"); resume=True continues."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    sets = [s for s in TINY_MODEL if s != "--set"] + ["run.progress=false", "aug.mix_group=8", "run.log_every=1",
                                                      "run.ckpt_every=1", "data.workers=0", "data.img_size=32",
                                                      "run.batch_size=16", "data.eval_batch_size=32"]
    script = (f"import fastdeit\nfrom fastdeit.errors import Stopped\n"
              f"cfg = fastdeit.config_from('demo', data={str(tiny_data)!r}, model='deit_tiny', out={str(out)!r}, "
              f"epochs=3, sets={sets!r})\n"
              f"try:\n    fastdeit.train(cfg)\nexcept Stopped as e:\n    print(type(e).__name__, '|', e, flush=True)\n"
              f"    print('epochs', fastdeit.train(cfg, resume=True)['epochs'])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").exists() and '"kind": "step"' in (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    first, second = stdout.strip().splitlines()[-2:]
    assert first.startswith("Stopped | stopped at epoch ") and first.endswith(
        f"; saved {out / 'checkpoint-last.pt'}: fastdeit.train(cfg, resume=True) continues"), first
    assert second == "epochs 3"
