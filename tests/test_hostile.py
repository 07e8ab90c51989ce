"""Inputs a hostile user tried: images of unusual modes, diverged weights, file names that are
not UTF-8 or hold a newline, and flags at the edge of their range."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_faults import one_line, run, train, trained

from fastdeit.data.folder import load_dataset
from fastdeit.data.loaders import read_skip_list
from fastdeit.data.preparing import encode
from fastdeit.pipelines import dali
from fastdeit.pipelines.reference import decode, to_rgb

needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed")


def raw_png(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL writes no 16-bit RGB): gray 0, RGB 2."""
    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    head = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **options)
    return buf.getvalue()


def unusual_pngs() -> dict[str, bytes]:
    """16-bit gray (a true mean near 128), 16-bit RGB, a palette with transparency, LA, RGBA."""
    rng = np.random.default_rng(0)
    gray16 = (np.linspace(0, 65535, 24 * 32).reshape(24, 32) + rng.integers(-300, 300, (24, 32))).clip(0, 65535)
    palette = Image.fromarray(rng.integers(0, 4, (24, 32)).astype(np.uint8), "P")
    palette.putpalette([250, 10, 10, 10, 240, 20, 30, 30, 220, 100, 110, 120])
    return {"gray16.png": raw_png(gray16.astype(np.uint16), 0),
            "rgb16.png": raw_png(rng.integers(0, 65536, (24, 32, 3)), 2),
            "palette.png": png(palette, transparency=bytes([0, 128, 255, 40])),
            "la.png": png(Image.fromarray(rng.integers(0, 256, (24, 32, 2)).astype(np.uint8), "LA")),
            "rgba.png": png(Image.fromarray(rng.integers(0, 256, (24, 32, 4)).astype(np.uint8), "RGBA"))}


def dali_decoded(files: list[bytes]) -> list[np.ndarray]:
    """What DALI's CPU decoder makes of each file, as RGB."""
    from nvidia.dali import fn, pipeline_def, types

    batch = [np.frombuffer(f, np.uint8) for f in files]

    @pipeline_def(batch_size=len(batch), num_threads=1, device_id=None)
    def graph():
        data = fn.external_source(source=lambda: batch, batch=True)
        return fn.decoders.image(data, output_type=types.RGB, device="cpu")

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[i]) for i in range(len(batch))]


def test_high_bit_depth_gray_is_scaled_not_clipped():
    wide = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    expected = (wide.astype(np.int64) + 128) // 257  # what DALI gives: round(v / 257)
    for img in (Image.frombytes("I;16", (32, 32), wide.astype("<u2").tobytes()),
                Image.frombytes("I;16B", (32, 32), wide.astype(">u2").tobytes()),
                Image.fromarray(wide.astype(np.int32))):  # mode "I"
        rgb = np.asarray(to_rgb(img)).astype(np.int64)
        assert rgb.shape == (32, 32, 3) and (rgb == expected[..., None]).all(), img.mode
    stored, _, _ = encode(unusual_pngs()["gray16.png"], 16, 95)  # prepare-data re-encodes it
    assert abs(np.asarray(Image.open(io.BytesIO(stored))).mean() - 128) < 3


@needs_dali
def test_the_reference_decodes_unusual_pngs_as_dali_does(tmp_path):
    files = unusual_pngs()
    for (name, data), theirs in zip(files.items(), dali_decoded(list(files.values()))):
        ours = np.asarray(decode(io.BytesIO(data))).astype(int)
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1, name
    assert abs(np.asarray(decode(io.BytesIO(files["gray16.png"]))).mean() - 128) < 3

    for split in ("train", "val"):  # check-data finds nothing to refuse in them
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for name, data in files.items():
                (tmp_path / split / c / name).write_bytes(data)
    code, stdout, err = run("check-data", str(tmp_path))
    assert code == 0 and stdout == "" and "0 unreadable of 20 images" in err, err


@pytest.fixture(scope="module")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained tiny run for the tests that only read it."""
    return trained(tiny_data, tmp_path_factory.mktemp("hostile") / "run")


def test_diverged_weights_get_no_score(tiny_run, tiny_data, tmp_path):
    state = torch.load(tiny_run / "checkpoint-last.pt", weights_only=True)
    next(iter(state["model"].values())).fill_(float("nan"))
    diverged = tmp_path / "checkpoint-diverged.pt"
    torch.save(state, diverged)
    image = next((tiny_data / "val").glob("*/*.jpg"))
    for args in (["eval", "--data", str(tiny_data), "--ckpt", str(diverged)],
                 ["predict", str(image), "--weights", str(diverged)],
                 ["export", str(diverged), "--out", str(tmp_path / "hf")]):
        line = one_line(args, "not finite")
        assert "diverged" in line and "checkpoint-last.pt" in line, line
    assert not (tmp_path / "hf").exists()


def odd_names(data: Path) -> list[str]:
    """Add to each split of `data` a JPEG whose name holds a byte that is not UTF-8, one whose
    name holds a newline, and a cut one with both; returns the cut ones, as check-data lists them."""
    cut = []
    for split in ("train", "val"):
        good = sorted((data / split).glob("*/*.jpg"))
        folder = os.fsencode(good[0].parent)
        shutil.copy(good[0], os.fsdecode(folder + b"/bad\xff.jpg"))
        shutil.copy(good[1], good[1].parent / "new\nline.jpg")
        raw = good[2].read_bytes()
        Path(os.fsdecode(folder + b"/cut\xfe\nname.jpg")).write_bytes(raw[: len(raw) * 2 // 3])
        cut.append(os.fsdecode(os.fsencode(f"{split}/{good[0].parent.name}/") + b"cut\xfe\nname.jpg"))
    return cut


def test_file_names_that_are_not_utf8_or_hold_a_newline(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDEIT_CACHE", str(tmp_path / "cache"))
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    cut = odd_names(data)
    listing = tmp_path / "bad.txt"
    for _ in range(2):  # the second start reuses the stored index
        code, stdout, err = run("index", str(data))
        assert code == 0 and json.loads(stdout.splitlines()[-1])["train"] == 75, err
        code, stdout, err = run("check-data", str(data), "--out", str(listing))
        assert code == 0 and stdout.splitlines() == listing.read_text().splitlines(), err
        assert "2 unreadable of 96 images" in err and len(stdout.splitlines()) == 2
    skipped = read_skip_list(str(listing), *load_dataset(data))  # the list names them exactly
    assert [f"{split}/{index.paths[i]}" for split, index in zip(("train", "val"), skipped) for i in index.skip] == cut

    for extra in ((), ("--set", f"data.skip_list={listing}")):  # a fresh run each, the stored index reused
        code, _, err = run(*train(data, tmp_path / f"run{len(extra)}", "--epochs", "2", *extra))
        assert code == 0 and "warning: skipped unreadable image" in err, err
        summary = json.loads((tmp_path / f"run{len(extra)}" / "summary.json").read_text())
        assert summary["bad_files"] == [cut[0].removeprefix("train/")]


def test_a_prepared_set_keeps_names_that_are_not_utf8(tiny_data, tmp_path):
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    first = sorted((data / "train").glob("*/*.jpg"))[0]
    odd = Path(os.fsdecode(os.fsencode(first.parent) + b"/bad\xff.jpg"))
    shutil.copy(first, odd)
    code, _, err = run("prepare-data", str(data), str(tmp_path / "prep"), "--workers", "1")
    assert code == 0, err
    train_idx, _ = load_dataset(tmp_path / "prep")
    row = train_idx.paths.index(f"{odd.parent.name}/{odd.name}")
    assert train_idx.read(row).tobytes() == first.read_bytes()
    code, stdout, err = run("check-data", str(tmp_path / "prep"), "--loader", "torch")
    assert code == 0 and stdout == "", err


def test_predict_topk_below_one_is_refused_and_above_the_classes_lists_them_all(tiny_run, tiny_data):
    image = str(next((tiny_data / "val").glob("*/*.jpg")))
    one_line(["predict", image, "--weights", str(tiny_run), "--topk", "0"], "--topk 0")
    code, stdout, err = run("predict", image, "--weights", str(tiny_run), "--topk", "7")
    assert code == 0 and len(json.loads(stdout)["top"]) == 3 and "the model has 3 classes" in err, err
