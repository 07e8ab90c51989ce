"""fastdeit export: Hugging Face transformers and timm load what it writes, with fastdeit's logits."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.models.factory import head_logits
from fastdeit.pipelines.tail import normalize
from fastdeit.training.evaluate import load_for_inference

from tiny import TINY_MODEL, TINY_RUN

transformers = pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    out = {}
    for model in ("deit_tiny_distilled", "deit_tiny"):
        res = runner.invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", model,
                                  "--out", str(root / model)])
        assert res.exit_code == 0, res.output
        out[model] = root / model / "checkpoint-last.pt"
    return out


def ours(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    model = load_for_inference(ckpt, None).model
    with torch.no_grad():
        return head_logits(model, x)["joint"]


@pytest.mark.parametrize("model", ["deit_tiny_distilled", "deit_tiny"])
def test_hf_export_gives_fastdeits_logits(runs, model, tmp_path):
    out = tmp_path / "hf"
    res = runner.invoke(app, ["export", str(runs[model]), "--format", "hf", "--out", str(out)])
    assert res.exit_code == 0, res.output
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == ("DeiTForImageClassificationWithTeacher" if "distilled" in model
                                 else "ViTForImageClassification")
    with torch.no_grad():
        got = hf(pixel_values=x).logits
    assert torch.allclose(got, ours(runs[model], x), atol=1e-4)
    assert hf.config.id2label == {0: "00_disk", 1: "01_square", 2: "02_triangle"}
    # The image processor is the eval transform: shorter side to size / crop_pct, bicubic, centre crop.
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    from fastdeit.data.folder import ImageIndex
    from fastdeit.pipelines.reference import EvalSamples

    path = tmp_path / "x.png"
    img.save(path)
    index = ImageIndex(Path("/"), ("a",), (str(path),), np.zeros(1, np.int64), np.zeros((1, 2), np.int32),
                       np.zeros(1, np.int64))
    ref = normalize(EvalSamples(index, 32, 0.875)[0][0][None])
    pix = processor(images=img, return_tensors="pt")["pixel_values"]
    assert pix.shape == ref.shape and (pix - ref).abs().mean() < 0.02


def test_timm_and_safetensors_exports_load(runs, tmp_path):
    ckpt = runs["deit_tiny_distilled"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = runner.invoke(app, ["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "timm")])
    assert res.exit_code == 0, res.output
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), ours(ckpt, x), atol=1e-5)
    assert model.pretrained_cfg["label_names"] == ["00_disk", "01_square", "02_triangle"]
    res = runner.invoke(app, ["export", str(ckpt.parent), "--format", "safetensors", "--out", str(tmp_path / "st")])
    assert res.exit_code == 0, res.output
    from fastdeit.training.rundir import read_weights

    got, _ = read_weights(tmp_path / "st" / "model.safetensors")  # a run folder: its best checkpoint
    want = load_for_inference(ckpt.parent / "checkpoint-best.pt", None).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    fails = runner.invoke(app, ["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "timm")])
    assert fails.exit_code == 2 and "not empty" in fails.stderr


def test_a_transformers_folder_is_read_back_as_weights(runs, tiny_data, tmp_path):
    """The hf export given to `eval --weights` (with the tiny architecture): fastdeit's own accuracy."""
    import json as js

    from fastdeit.training.rundir import read_weights, weights_of

    ckpt = runs["deit_tiny_distilled"]
    res = runner.invoke(app, ["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    got, _ = read_weights(tmp_path / "hf")
    want = load_for_inference(ckpt, None).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(js.dumps({"model_type": "bert"}))
    with pytest.raises(Exception, match="fastdeit reads ViT and DeiT folders"):
        read_weights(tmp_path / "bert")
    # predict, the API's evaluate and load take a transformers folder as it is (not as a run folder)
    assert weights_of(tmp_path / "hf") == tmp_path / "hf" and weights_of(tmp_path / "bert") == tmp_path / "bert"
    res = runner.invoke(app, ["predict", str(tiny_data / "val"), "--weights", str(tmp_path / "bert")])
    assert res.exit_code == 2 and "fastdeit reads ViT and DeiT folders" in res.stderr, res.output


@pytest.mark.parametrize("model", ["deit_tiny_distilled", "deit_tiny"])
@pytest.mark.parametrize("fmt", ["hf", "timm", "safetensors"])
def test_an_export_folder_is_read_back_as_it_was_trained(runs, tiny_data, tmp_path, model, fmt):
    """eval, predict, fastdeit.load and --teacher-ckpt take fastdeit's own export folder: an hf or
    timm folder names its model, shape, classes, image size and crop (no --model); a
    safetensors folder is its one file, which needs --model."""
    from fastdeit.errors import UserError
    from fastdeit.training.rundir import weights_of

    out = tmp_path / fmt
    assert runner.invoke(app, ["export", str(runs[model]), "--format", fmt, "--out", str(out)]).exit_code == 0
    want = load_for_inference(runs[model], None)
    if fmt == "safetensors":
        assert weights_of(out) == out / "model.safetensors"
        with pytest.raises(UserError, match="pass --model"):
            load_for_inference(out, None)
        return
    got = load_for_inference(out, None)
    assert (got.classes, got.img_size) == (want.classes, want.img_size)
    assert int(got.img_size / got.crop_pct) == int(want.img_size / want.crop_pct)  # the same eval resize
    sd, ref = got.model.state_dict(), want.model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    res = runner.invoke(app, ["eval", "--data", str(tiny_data), "--ckpt", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with pytest.raises(UserError, match="holds no EMA weights"):
        load_for_inference(out, None, use_ema=True)
    if fmt == "hf":  # a config of other shapes: one line, never a traceback
        import json as js

        config = js.loads((out / "config.json").read_text())
        (out / "preprocessor_config.json").write_text('{"size": [36]}')  # not ours: the default crop
        assert load_for_inference(out, None).crop_pct == pytest.approx(0.875)
        (out / "config.json").write_text(js.dumps({**config, "id2label": ["a", "b", "c"]}))
        with pytest.raises(UserError, match="not a ViT / DeiT image classifier folder"):
            load_for_inference(out, None)


@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_an_edited_export_says_where_its_config_and_weights_disagree(runs, tiny_data, tmp_path, fmt):
    """An export whose image size was edited evaluated at the new size, its position embedding
    resampled, without a word; labels that do not match the head became 'class N' silently."""
    import json as js

    out = tmp_path / fmt
    assert runner.invoke(app, ["export", str(runs["deit_tiny"]), "--format", fmt, "--out", str(out)]).exit_code == 0
    config = js.loads((out / "config.json").read_text())
    if fmt == "hf":
        config.update(image_size=64, id2label={"0": "a", "1": "b"})
    else:
        config["model_args"]["img_size"] = 64
        config["label_names"] = ["a", "b"]
    (out / "config.json").write_text(js.dumps(config))
    res = runner.invoke(app, ["eval", "--data", str(tiny_data), "--ckpt", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {out}: its config names 2 classes, its head has 3: the classes are shown as 'class N' "
                     f"and not checked against the data's",
                     f"note: {out}: its config says image size 64, its weights were trained at 32 px: it runs at 64 "
                     f"px with the position embedding resampled (accuracy is usually lower)"], res.stderr


def test_a_folder_of_several_safetensors_is_named_as_such(runs, tmp_path):
    out = tmp_path / "two"
    assert runner.invoke(app, ["export", str(runs["deit_tiny"]), "--format", "safetensors", "--out",
                               str(out)]).exit_code == 0
    (out / "model.safetensors").rename(out / "a.safetensors")
    (out / "b.safetensors").write_bytes((out / "a.safetensors").read_bytes())
    res = runner.invoke(app, ["eval", "--data", str(tmp_path), "--ckpt", str(out), "--model", "deit_tiny"])
    assert res.exit_code == 2 and res.stderr.strip().splitlines()[-1] == (
        f"error: {out} holds 2 .safetensors files (a.safetensors, b.safetensors) and no config.json saying what "
        f"they are: name one"), res.output
