"""Weights in: official DeiT files, timm state dicts, safetensors, URLs; every mismatch one line."""

import argparse
import http.server
import json
import random
import threading
import typing
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.config.schema import ModelConfig
from fastdeit.errors import UserError
from fastdeit.models.factory import build_model
from fastdeit.models.fetch import local_weights
from fastdeit.training.rundir import read_weights

runner = CliRunner()


def fails(args: list[str], words: str) -> None:
    res = runner.invoke(app, args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], res.stderr


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A DeiT-tiny (3 classes) saved as the official training script saves: model, optimizer
    state, epoch and its argparse Namespace."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=3).eval()
    path = tmp_path_factory.mktemp("w") / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 299, "args": argparse.Namespace(model="deit_tiny", lr=5e-4)},
               path)
    return path, model


def test_an_official_training_checkpoint_loads_and_other_objects_are_refused(official, tmp_path):
    sd, meta = read_weights(official[0])
    assert meta == {} and torch.equal(sd["cls_token"], official[1].state_dict()["cls_token"])
    other = tmp_path / "other.pth"
    torch.save({"model": official[1].state_dict(), "when": __import__("datetime").date(2021, 1, 1)}, other)
    with pytest.raises(UserError, match="refused"):
        read_weights(other)


def test_safetensors_and_bare_state_dicts_load(official, tmp_path):
    sd = official[1].state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "bare.pth")
    for name in ("w.safetensors", "bare.pth"):
        got, _ = read_weights(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_eval_of_an_official_file_equals_timms_logits(official, tiny_data):
    from fastdeit.data.folder import load_dataset
    from fastdeit.pipelines.reference import eval_loader

    res = runner.invoke(app, ["eval", "--data", str(tiny_data), "--weights", str(official[0]), "--model",
                              "deit_tiny", "--workers", "0", "--loader", "torch"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    _, val = load_dataset(tiny_data)
    correct = total = 0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        for images, labels, _ok in eval_loader(val, 224, 0.875, 32, 0):
            logits = official[1]((images.float() / 255 - mean) / std)
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
    assert got["images"] == total and got["top1"] == pytest.approx(100 * correct / total)


def test_each_mismatch_is_one_line(official, tiny_data, tmp_path):
    base = ["eval", "--data", str(tiny_data), "--workers", "0", "--loader", "torch"]
    fails([*base, "--weights", str(official[0]), "--model", "deit_small"],
          "cls_token is (1, 1, 192) in the file, (1, 1, 384) in the model")
    fails([*base, "--weights", str(official[0]), "--model", "deit_tiny_distilled"], "without a distillation token")
    dist = tmp_path / "dist.pth"
    torch.save({"model": timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3).state_dict()}, dist)
    fails([*base, "--weights", str(dist), "--model", "deit_tiny"], "a distilled DeiT")
    thousand = tmp_path / "1000.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), thousand)
    fails([*base, "--weights", str(thousand), "--model", "deit_tiny"], "predicts 1000 classes")
    fails([*base, "--weights", str(official[0]), "--model", "deit_tiny", "--patch-size", "8"], "patch size 16")
    fails([*base, "--weights", str(tmp_path / "none.pth"), "--model", "deit_tiny"], "does not exist")
    fails([*base, "--weights", str(official[0])], "--model")


def test_fine_tuning_at_384_resamples_as_the_official_code(official):
    """The official fine-tuning: the grid of patch positions, bicubic, no antialiasing; the
    class (and distillation) token positions kept."""
    model = build_model(ModelConfig(name="deit_tiny", init=str(official[0])), 3, 384)
    old = official[1].state_dict()["pos_embed"]
    grid = old[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(24, 24), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    want = torch.cat([old[:, :1], want.reshape(1, 576, -1)], 1)
    assert torch.allclose(model.pos_embed.detach(), want, atol=1e-6)


class _Files(http.server.SimpleHTTPRequestHandler):
    hits: typing.ClassVar[list] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        _Files.hits.append(self.path)
        super().do_GET()


def test_weights_by_url_download_once_and_are_checked(official, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    blob = official[0].read_bytes()
    digest = __import__("hashlib").sha256(blob).hexdigest()
    (served / f"deit-{digest[:8]}.pth").write_bytes(blob)
    (served / "deit-00000000.pth").write_bytes(blob)  # a name whose hash prefix does not match
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: _Files(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cache = tmp_path / "cache"
        first = local_weights(f"{base}/deit-{digest[:8]}.pth", cache)
        assert first.read_bytes() == blob and len(_Files.hits) == 1
        assert local_weights(f"{base}/deit-{digest[:8]}.pth", cache) == first and len(_Files.hits) == 1
        first.write_bytes(blob[:1000])  # a damaged copy is fetched again
        assert local_weights(f"{base}/deit-{digest[:8]}.pth", cache).read_bytes() == blob and len(_Files.hits) == 2
        with pytest.raises(UserError, match="hash"):
            local_weights(f"{base}/deit-00000000.pth", cache)
        with pytest.raises(UserError, match="cannot download"):
            local_weights(f"{base}/missing.pth", cache)
    finally:
        server.shutdown()


def test_random_bytes_are_never_read_as_a_checkpoint(tmp_path):
    """torch's reader fails on garbage in many ways: seeds 2 and 20 made it raise IndexError and
    KeyError (a bare exit 1 in CI, where the file was os.urandom's); each is one UserError."""
    from fastdeit.training.rundir import read_weights

    bad = tmp_path / "r.pt"
    for seed in range(300):
        bad.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(UserError):  # "not a readable checkpoint", or "holds Python objects": one line
            read_weights(bad)
    # A pickle opcode torch refuses (BYTEARRAY8) claiming 2^60 bytes: reading the stream for
    # object opcodes afterwards raised MemoryError (a bare exit 1, once in a CI run: os.urandom).
    bad.write_bytes(b"\x80\x05\x96" + (2**60).to_bytes(8, "little") + bytes(64))
    with pytest.raises(UserError, match="not a readable"):
        read_weights(bad)


def test_a_run_folder_is_read_as_its_best_checkpoint(tmp_path):
    """--init RUN and --teacher-ckpt RUN read the run's best checkpoint (its last without one),
    as eval and predict do; a folder without either is one line."""
    from fastdeit.training.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.create()
    with pytest.raises(UserError, match="holds no checkpoint"):
        read_weights(run.root)
    last, best = ({"model": {"w": torch.full((2,), float(v))}, "meta": {"img_size": v}} for v in (1, 2))
    torch.save(last, run.last)
    assert read_weights(run.root)[1] == {"img_size": 1}
    torch.save(best, run.best)
    sd, meta = read_weights(run.root)
    assert meta == {"img_size": 2} and torch.equal(sd["w"], torch.full((2,), 2.0))
    for text in ('["model_type"]', '"architecture"', "{", "7"):  # a config.json that is no model's
        run.config.write_text(text)
        assert read_weights(run.root)[1] == {"img_size": 2}
