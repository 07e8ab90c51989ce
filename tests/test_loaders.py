"""Choosing the pipeline, the skip list, `fastdeit check-data`, and training with DALI on the CPU."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.data.folder import scan_split
from fastdeit.data.loaders import choose_loader, read_skip_list
from fastdeit.errors import UserError
from fastdeit.pipelines import dali
from fastdeit.pipelines.dali import decode as dali_decode

from tiny import TINY_MODEL, TINY_RUN

runner = CliRunner()
needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed")


def test_auto_choice_says_why(monkeypatch):
    assert choose_loader("auto", torch.device("cpu")) == ("torch", "no CUDA device; --loader dali runs DALI on the CPU")
    assert choose_loader("torch", torch.device("cpu"))[0] == "torch"
    monkeypatch.setattr(dali, "available", lambda: False)
    assert choose_loader("auto", torch.device("cuda"))[1].startswith("DALI is not installed")
    with pytest.raises(UserError, match="data.loader dali: NVIDIA DALI is not installed"):
        choose_loader("dali", torch.device("cpu"))


def test_skip_list(tiny_data, tmp_path):
    train, val = scan_split(tiny_data, "train"), scan_split(tiny_data, "val")
    listing = tmp_path / "skip.txt"
    listing.write_text(f"# found by check-data\ntrain/{train.paths[4]}\nval/{val.paths[1]}\n")
    t2, v2 = read_skip_list(str(listing), train, val)
    assert t2.skip == {4} and v2.skip == {1}
    listing.write_text("test/a/b.jpg\n")
    with pytest.raises(UserError, match="is not train/<class>/<file>"):
        read_skip_list(str(listing), train, val)
    with pytest.raises(UserError, match="cannot read"):
        read_skip_list(str(tmp_path / "none.txt"), train, val)


def test_check_data_lists_unreadable_files(tiny_data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    broken = sorted((root / "train").glob("*/*.jpg"))[10]
    broken.write_bytes(broken.read_bytes()[:250])
    val_broken = sorted((root / "val").glob("*/*.jpg"))[0]
    val_broken.write_bytes(b"\x00" * 100)
    res = runner.invoke(app, ["check-data", str(root), "--out", str(tmp_path / "bad.txt")])
    assert res.exit_code == 0, res.output
    expected = [str(broken.relative_to(root)), str(val_broken.relative_to(root))]
    assert res.stdout.split() == expected
    assert (tmp_path / "bad.txt").read_text().split() == expected
    assert "2 unreadable of 90 images" in res.stderr
    # training with that list skips the files up front and reports them
    res = runner.invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(root), "--model", "deit_tiny",
                              "--out", str(tmp_path / "run"), "--set", f"data.skip_list={tmp_path / 'bad.txt'}"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_files"] == [str(broken.relative_to(root / "train"))]


@needs_dali
def test_train_and_eval_with_dali_on_the_cpu(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny",
                              "--out", str(out), "--loader", "dali", "--epochs", "2",
                              "--set", "aug.rand_augment=rand-m9-mstd0.5-inc1", "--set", "aug.mixup=0.8"])
    assert res.exit_code == 0, res.output
    assert "loader: dali (--loader dali)" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    res = runner.invoke(app, ["eval", "--data", str(tiny_data), "--ckpt", str(out / "checkpoint-last.pt"),
                              "--loader", "dali", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["top1"] == pytest.approx(summary["top1"])


def test_the_gpu_decoder_keeps_the_plan_world_size_independent():
    """nvJPEG's hardware decoder takes images by their position in the per-rank batch: off by
    default, so every image meets the same decoder whatever the world size."""
    assert dali_decode.decoder_options("gpu") == {"device": "mixed", "hw_decoder_load": 0.0}
    assert dali_decode.decoder_options("gpu", hw_decode=True) == {"device": "mixed"}
    assert dali_decode.decoder_options("cpu") == {"device": "cpu"}
    from fastdeit.config.schema import DataConfig

    assert DataConfig().hw_decode is False


def test_dali_for_a_newer_cuda_than_the_driver_is_one_line(monkeypatch):
    from fastdeit.data import loaders

    monkeypatch.setattr(dali, "available", lambda: True)
    monkeypatch.setattr(dali, "cuda_major", lambda: 13)
    monkeypatch.setattr(loaders, "cuda_driver_version", lambda: 12040)
    for name in ("auto", "dali"):
        with pytest.raises(UserError, match=r"built for CUDA 13 .* supports CUDA 12\.4: .*fastdeit\[cuda12\]"):
            choose_loader(name, torch.device("cuda"))
    monkeypatch.setattr(loaders, "cuda_driver_version", lambda: 13000)
    assert choose_loader("auto", torch.device("cuda"))[0] == "dali"


def test_install_floors_are_versions_the_code_works_with():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    base = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    floors = dict(re.findall(r'"([\w-]+)>=([\d.]+)"', base))
    assert tuple(map(int, floors["timm"].split("."))) >= (1, 0, 16)  # timm.layers.Attention (1.0.15 fails to import)
    assert tuple(map(int, floors["torch"].split("."))) >= (2, 6)  # torch.library.triton_op
    assert "dali" not in base  # one DALI wheel per CUDA major, and they cannot live together: an extra each
    assert re.search(r"^cuda12 = .*nvidia-dali-cuda120", text, re.M) and re.search(r"^cuda13 = .*cuda130", text, re.M)
