"""The one option table (fastdeit/config/flags.py) is what the commands, the API and the docs
read: each option declared once, each config key a real one, docs/cli.md's table the code's."""

from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from fastdeit.api import SETTINGS, config_from
from fastdeit.cli.commands import app
from fastdeit.config.flags import BEGIN, COMMANDS, END, OPTIONS, flags_of, key_flags, markdown
from fastdeit.config.schema import TrainConfig, with_section
from fastdeit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_every_option_is_used_and_every_key_is_a_config_key():
    used = {name for table in COMMANDS.values() for name in table}
    assert used == set(OPTIONS), f"declared but unused: {set(OPTIONS) - used}"
    cfg = TrainConfig()
    for opt in OPTIONS.values():
        if opt.key:
            section, key = opt.key.split(".")
            with_section(cfg, section, **{key: getattr(getattr(cfg, section), key)})  # raises on a wrong key


def test_the_commands_take_exactly_the_tables_flags():
    commands = typer.main.get_command(app).commands
    for name, table in COMMANDS.items():
        got = {opt for p in commands[name].params for opt in p.opts}
        assert got == {f for option in table for f in flags_of(option)}, name


def test_the_docs_table_is_the_codes():
    doc = (ROOT / "docs" / "cli.md").read_text()
    shown = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert shown == markdown(), "docs/cli.md is stale: python -m fastdeit.config.flags --write docs/cli.md"


def test_the_apis_settings_are_trains_flags():
    assert {flag[2:].replace("-", "_"): key for key, flag in key_flags("train").items()} == SETTINGS
    assert SETTINGS["batch_size"] == "run.batch_size" and SETTINGS["compile"] == "run.compile"
    assert "topk" not in SETTINGS  # a cache-teacher flag only
    with pytest.raises(UserError, match="unknown setting 'topk'"):
        config_from("demo", data="d", out="o", topk=3)


@pytest.mark.parametrize("args, words", [
    (["eval", "--data", "d", "--ckpt", "c.pt", "--device", "gpu"], "--device must be one of auto, cpu, cuda"),
    (["eval", "--data", "d", "--ckpt", "c.pt", "--head", "both"], "--head must be one of cls, dist, joint"),
    (["cache-teacher", "--data", "d", "--teacher", "t", "--out", "c", "--loader", "ffcv"],
     "--loader must be one of auto, dali, torch"),
    (["cache-teacher", "--data", "d", "--teacher", "t", "--out", "c", "--mode", "all"],
     "--mode must be one of replay, labelmap"),
    (["train", "--data", "d", "--out", "o", "--log", "mlflow"], "--log must be one of none, tensorboard, wandb"),
])
def test_a_bad_choice_is_one_line_before_anything_runs(tmp_path, args, words):
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output


def test_an_error_names_a_key_by_a_flag_only_where_the_command_has_it(tmp_path):
    """train has no --topk: an error about distill.topk keeps the key; cache-teacher shows --topk."""
    assert "distill.topk" not in key_flags("train") and key_flags("cache-teacher")["distill.topk"] == "--topk"
    res = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--recipe", "demo",
                              "--set", "distill.topk=0"])
    assert res.exit_code == 2 and "distill.topk" in res.output, res.output
    res = runner.invoke(app, ["cache-teacher", "--data", str(tmp_path), "--teacher", "resnet10t", "--recipe", "demo",
                              "--out", str(tmp_path / "c"), "--topk", "0"])
    assert res.exit_code == 2 and "--topk" in res.output and "distill.topk" not in res.output, res.output


def test_a_key_is_named_by_a_flag_only_when_the_flag_was_given(tmp_path):
    """A bad value from a --config file (or the recipe) is named by its key: the user gave no
    --epochs; given on the command line, the same fault names the flag."""
    (tmp_path / "c.toml").write_text("[sched]\nepochs = 0\n[run]\nbatch_size = 20\n")
    base = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--recipe", "demo"]
    res = runner.invoke(app, [*base, "--config", str(tmp_path / "c.toml")])
    assert res.exit_code == 2 and "error: sched.epochs must be >= 1, got 0" in res.stderr, res.output
    res = runner.invoke(app, [*base, "--config", str(tmp_path / "c.toml"), "--epochs", "0"])
    assert res.exit_code == 2 and "error: --epochs must be >= 1, got 0" in res.stderr, res.output
    res = runner.invoke(app, [*base, "--config", str(tmp_path / "c.toml"), "--epochs", "1"])
    assert res.exit_code == 2 and "error: run.batch_size 20 is not a multiple" in res.stderr, res.output
    assert not (tmp_path / "r").exists()
