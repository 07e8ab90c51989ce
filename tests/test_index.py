"""The stored index of a data set: reused on the next start, and following every change of
the files (added, removed, resized, replaced)."""

import json
import shutil

import numpy as np
from typer.testing import CliRunner

import fastdeit.data.folder as folder
from fastdeit.cli.commands import app
from fastdeit.data.folder import scan_split
from fastdeit.data.stored_index import stored_path


def test_the_index_is_reused_and_follows_the_files(tiny_data, tmp_path, monkeypatch):
    data, cache = shutil.copytree(tiny_data, tmp_path / "data"), tmp_path / "cache"
    reads = []
    real = folder._header_size
    monkeypatch.setattr(folder, "_header_size", lambda p: reads.append(p) or real(p))

    def scan():
        reads.clear()
        index = scan_split(data, "train", cache_dir=cache)
        fresh = scan_split(data, "train")  # no stored index: every header read
        assert index.paths == fresh.paths and np.array_equal(index.sizes, fresh.sizes)
        assert np.array_equal(index.nbytes, fresh.nbytes) and index.fingerprint() == fresh.fingerprint()
        return index, len(reads) - len(fresh)

    assert scan()[1] == 72 and stored_path(cache, data / "train").exists()  # the first scan reads every header
    assert scan()[1] == 0  # the next start reads none
    files = sorted((data / "train").glob("*/*.jpg"))
    shutil.copy(files[0], files[0].with_name("added.jpg"))
    assert scan()[1] == 1  # only the new file
    files[1].unlink()
    index, read = scan()
    assert read == 0 and len(index) == 72
    other = sorted((data / "val").glob("*/*.jpg"))[0]
    files[2].write_bytes(other.read_bytes())  # replaced in place: another image, another size
    assert scan()[1] == 1


def test_the_index_command_stores_both_splits(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDEIT_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["index", str(tiny_data)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["train"] == 72
    assert all(stored_path(tmp_path / "cache", tiny_data / s).exists() for s in ("train", "val"))
