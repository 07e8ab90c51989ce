"""Configs as files: `fastdeit recipe NAME` prints TOML that `train --config` reads back
unchanged, a run's config.json reruns it, and a bad file is one line naming the file and the
key or line. The order: recipe < --config < flags < --set."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.config.files import apply_config_file
from fastdeit.config.recipes import RECIPES, recipe
from fastdeit.config.schema import TrainConfig

from tiny import TINY_MODEL, TINY_RUN

runner = CliRunner()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_round_trips_through_toml(name, tmp_path):
    res = runner.invoke(app, ["recipe", name, "--set", "run.seed=5", "--set", "aug.scale=0.2,1.0"])
    assert res.exit_code == 0, res.output
    (tmp_path / "r.toml").write_text(res.stdout)
    expected = TrainConfig.from_dict({**recipe(name).to_dict(), "run": {**recipe(name).to_dict()["run"], "seed": 5},
                                      "aug": {**recipe(name).to_dict()["aug"], "scale": [0.2, 1.0]}})
    assert apply_config_file(TrainConfig(), tmp_path / "r.toml") == expected


def test_the_order_is_recipe_file_flags_set(tiny_data, tmp_path):
    (tmp_path / "c.toml").write_text("[run]\nseed = 3\nlog_every = 2\n[sched]\nepochs = 7\n")
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny",
                              "--out", str(out), "--config", str(tmp_path / "c.toml"), "--set", "run.log_every=3"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    # the file over the recipe (seed), the flag over the file (--epochs 1), --set over both
    assert (cfg["run"]["seed"], cfg["sched"]["epochs"], cfg["run"]["log_every"]) == (3, 1, 3)


def test_a_runs_config_json_reruns_it(tiny_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert runner.invoke(app, ["train", *TINY_RUN, *TINY_MODEL, "--data", str(tiny_data), "--model", "deit_tiny",
                               "--out", str(a), "--seed", "4"]).exit_code == 0
    res = runner.invoke(app, ["train", "--config", str(a / "config.json"), "--out", str(b)])
    assert res.exit_code == 0, res.output
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert cb["run"].pop("out") == str(b) and ca["run"].pop("out") == str(a) and ca == cb
    first = next(json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines() if '"step"' in x)
    again = next(json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines() if '"step"' in x)
    assert first["loss"] == again["loss"]


def test_a_yaml_file_is_read_as_toml_is(tiny_data, tmp_path):
    (tmp_path / "c.yaml").write_text("run:\n  seed: 3\naug:\n  scale: [0.2, 1.0]\n")
    (tmp_path / "c.toml").write_text("[run]\nseed = 3\n[aug]\nscale = [0.2, 1.0]\n")
    from_yaml = apply_config_file(recipe("deit"), tmp_path / "c.yaml")
    assert from_yaml == apply_config_file(recipe("deit"), tmp_path / "c.toml") and from_yaml.run.seed == 3


@pytest.mark.parametrize("text, suffix, words", [
    ("[modle]\nname = 'x'\n", ".toml", "unknown config section 'modle'"),
    ("[model]\nnam = 'x'\n", ".toml", "unknown config key model.nam"),
    ("[run]\nseed = 'abc'\n", ".toml", "run.seed must be an integer"),
    ("[model\n", ".toml", "line 1"),
    ('{"run": {"seed": 1}', ".json", "not valid JSON"),
    ('{"run": 3}', ".json", "run = 3 is not a section"),
    ("[run]\nseed = 1\n", ".json", "not valid JSON"),
    ('[1, 2]', ".json", "got list"),
    ("run:\n  seed: [1\n", ".yaml", "not valid YAML at line"),
    ("run:\n  seed: abc\n", ".yml", "run.seed must be an integer"),
    ("model: deit_tiny\n", ".yaml", "model = 'deit_tiny' is not a section"),  # timm's flat args.yaml
    ("!!python/object/apply:os.system ['true']\n", ".yaml", "not valid YAML"),  # no tags that run code
    ('{"run": {"seed": 1, "seed": 2}}', ".json", "'seed' appears twice"),  # not last-wins
    ('{"run": {"seed": 1}, "run": {"seed": 2}}', ".json", "'run' appears twice"),
    ("run:\n  seed: 1\n  seed: 2\n", ".yaml", "'seed' appears twice"),
    ("[optim]\nlr = inf\n", ".toml", "optim.lr must be a finite number, got inf"),
    ('{"optim": {"lr": 1e309}}', ".json", "optim.lr must be a finite number"),
    ("optim:\n  betas: [0.9, .nan]\n", ".yaml", "optim.betas must be a finite number"),
    ("[sched]\nepochs = 1e26\n", ".toml", "sched.epochs must be at most"),
    ('{"run": ' + "[" * 5000 + "]" * 5000 + "}", ".json", "nested too deeply"),
    ('{"run": {"seed": ' + "[" * 20 + "]" * 20 + "}}", ".json", "nested more than 8 levels"),
    ("[run]\n" + "# padding\n" * 120_000, ".toml", "larger than 1024 KiB"),
    ('{"run": {"' + "k" * 2 * 10**6 + '": 1}}', ".json", "larger than 1024 KiB"),
    ('{"run": {"' + "k" * 10**5 + '": 1}}', ".json", "unknown config key run.kkkkk"),  # quoted, cut short
])
def test_a_bad_file_is_one_line_naming_it(tiny_data, tmp_path, text, suffix, words):
    bad = tmp_path / f"bad{suffix}"
    bad.write_text(text)
    res = runner.invoke(app, ["train", "--config", str(bad), "--data", str(tiny_data), "--out", str(tmp_path / "r")])
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and line.startswith(f"error: --config {bad}") and words in line, res.output[-2000:]
    assert len(line) < 1000 and not (tmp_path / "r").exists()


def test_a_file_that_is_not_text_is_one_line(tiny_data, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[run]\nseed = 1\n\xd0\x00\xff")
    res = runner.invoke(app, ["train", "--config", str(bad), "--data", str(tiny_data), "--out", str(tmp_path / "r")])
    line = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and line == (f"error: --config {bad}: not a text file (not UTF-8): give a TOML, YAML or "
                                                 "JSON file")
    assert not (tmp_path / "r").exists()


def _fastdeit(args: list[str], memory_gib: int = 3, timeout: int = 120) -> subprocess.CompletedProcess:
    """The installed command, its heap capped (a config that makes it allocate without end fails
    the test instead of the machine) and its time bounded (one that hangs fails too)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_gib << 30, memory_gib << 30))

    return subprocess.run([str(Path(sys.executable).with_name("fastdeit")), *args], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap)


def _alias_bomb(path: Path, key: str, width: int, levels: int) -> None:
    """About 1 KB of YAML whose value under `key` expands to width**levels strings (shared until
    printed: 9**9 of them took fastdeit to 23 GB)."""
    lines = ["run:", f"  x0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    section, name = key.split(".")
    lines += [f"{section}:" if section != "run" else "", f"  {name}: *a{levels - 1}"]
    path.write_text("\n".join(line for line in lines if line) + "\n")


@pytest.mark.parametrize("key", ["run.seed", "optim.betas"])
@pytest.mark.parametrize("width, levels, words", [
    (9, 9, "nested more than 8 levels; a config is sections of keys"),
    (40, 4, "more than 10,000 values (YAML aliases counted as copies); a config is about a hundred"),
])
def test_an_alias_bomb_is_refused_in_bounded_memory(tiny_data, tmp_path, key, width, levels, words):
    bomb = tmp_path / "bomb.yaml"
    _alias_bomb(bomb, key, width, levels)
    assert bomb.stat().st_size < 1200
    res = _fastdeit(["train", "--config", str(bomb), "--data", str(tiny_data), "--out", str(tmp_path / "r")])
    assert res.returncode == 2 and res.stderr.strip() == f"error: --config {bomb}: {words}", res.stderr[-2000:]


def test_special_files_are_refused_at_once(tiny_data, tmp_path):
    """A FIFO would block the open for ever, /dev/zero read without end, a folder is no file."""
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        res = _fastdeit(["train", "--config", str(path), "--data", str(tiny_data), "--out", str(tmp_path / "r")],
                        timeout=60)
        assert res.returncode == 2 and res.stderr.strip() == (f"error: --config {path}: not a regular file (a "
                                                              f"folder, FIFO or device): give a TOML, YAML or JSON "
                                                              f"file"), res.stderr


def test_a_runs_config_json_reruns_from_another_folder(tiny_data, tmp_path):
    """A run started with relative paths stored them relative: a rerun from elsewhere found no data."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "data").symlink_to(tiny_data)
    cli = [sys.executable, "-c", "from fastdeit.cli.commands import run_app; run_app()"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.run([*cli, "train", *TINY_RUN, *TINY_MODEL, "--data", "data", "--model", "deit_tiny",
                            "--out", "runs/a"], cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    config = json.loads((work / "runs" / "a" / "config.json").read_text())
    assert config["data"]["path"] == str(work / "data") and config["run"]["out"] == str(work / "runs" / "a")
    again = subprocess.run([*cli, "train", "--config", str(work / "runs" / "a" / "config.json"), "--out", "b"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
