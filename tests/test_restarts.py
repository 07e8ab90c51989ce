"""Restarts that must lose nothing: what a killed writer left, a run killed before its first
checkpoint or while evaluating, a finished run resumed, a resume that fails (found by
benchmarks/soak.py and the hostile-user review; the other faults are in test_faults.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_faults import one_line, records, run, train, trained


@pytest.fixture
def data(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def test_what_a_killed_writer_left_half_written_is_removed_by_the_next_start(data, tmp_path):
    out = trained(data, tmp_path / "run")
    torn = out / "checkpoint-last.pt.4242.tmp"  # kill -9 during a checkpoint write leaves this
    torn.write_bytes(b"half a checkpoint")
    code, _, err = run(*train(data, out, "--resume", str(out)))  # a run folder: its checkpoint-last.pt
    assert code == 0, err
    assert not torn.exists() and not (out / ".lock").exists()


def test_a_finished_run_resumed_keeps_its_summary_and_a_failed_resume_leaves_no_folder(data, tmp_path):
    out = trained(data, tmp_path / "run")
    before = (out / "summary.json").read_text()
    code, _, err = run(*train(data, out, "--resume=auto"))
    assert code == 0 and "already trained" in err and (out / "summary.json").read_text() == before
    one_line(train(data, tmp_path / "new", "--resume", str(tmp_path / "missing.pt")), "no checkpoint at")
    assert not (tmp_path / "new").exists()
    one_line(train(data, tmp_path / "new", "--resume", str(tmp_path)), "is a folder without checkpoint-last.pt")


def test_a_run_killed_while_evaluating_evaluates_that_epoch_when_resumed(data, tmp_path, monkeypatch):
    from fastdeit.training.trainer import Trainer

    whole = trained(data, tmp_path / "whole", "--epochs", "2")
    real, calls = Trainer.evaluate, {"n": 0}

    def dies(self, model):
        calls["n"] += 1
        if calls["n"] == 2:  # the last epoch's evaluation: killed in the middle of it
            raise KeyboardInterrupt
        return real(self, model)

    monkeypatch.setattr(Trainer, "evaluate", dies)
    out = tmp_path / "run"
    assert run(*train(data, out, "--epochs", "2"))[0] == 130
    monkeypatch.setattr(Trainer, "evaluate", real)
    assert trained(data, out, "--epochs", "2", "--resume=auto")
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (out, whole))
    assert ours["top1"] == theirs["top1"] and ours["train_img_s"] is not None
    assert [r["epoch"] for r in records(out, "epoch")] == [0, 1]


def test_a_run_killed_before_its_first_checkpoint_starts_over_on_resume(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "step", "epoch": 0, "step": 0, "updates": 1, "loss": 9.0}\n')
    one_line(train(data, out), "already holds a run")  # without --resume: still refused
    code, _, err = run(*train(data, out, "--resume=auto"))
    assert code == 0 and "starting the run" in err, err
    assert records(out, "step")[-1]["loss"] != 9.0


def test_a_checkpoint_of_an_earlier_version_resumes_with_nothing_pending(data, tmp_path):
    """Checkpoints written before RunState.pending could be None hold {} when no evaluation
    waits: read as nothing pending, the run resumes at its next epoch and evaluates no phantom
    epoch."""
    import torch

    out = trained(data, tmp_path / "run", "--epochs", "1")
    ckpt = out / "checkpoint-last.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["state"]["pending"] is None  # as this version writes it
    saved["state"]["pending"] = {}
    torch.save(saved, ckpt)
    assert trained(data, out, "--epochs", "2", "--resume=auto")
    assert [r["epoch"] for r in records(out, "epoch")] == [0, 1]
