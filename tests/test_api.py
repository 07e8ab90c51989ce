"""The Python API: the README's example runs as printed (on a tiny data set standing in for
`fastdeit make-data demo-data`), and bad input raises UserError instead of exiting."""

import re
import shutil

import pytest
import torch

from fastdeit.errors import UserError

from tiny import ROOT


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
    with pytest.raises(UserError, match="--data DIR is required"):
        fastdeit.config_from("demo", out=str(tmp_path / "r"))
    with pytest.raises(UserError, match="unknown recipe|recipe"):
        fastdeit.config_from("nope", data=str(tiny_data), out=str(tmp_path / "r"))
