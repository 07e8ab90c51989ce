"""N ranks against one process, on CPU with gloo: gradients and parameters, whole runs through
`fastdeit train --gpus 0 --procs 2` (torchrun), distributed eval, a killed and restarted
worker group, and the launcher's one-line errors.

Tolerances: two ranks average their gradients with an all-reduce, one process takes the mean
over the whole batch: the same sum in another order, so values agree to float32 rounding
(measured ~5e-7 on parameters after 4 AdamW steps); we allow 1e-5. Evaluation counts are
integers and must be equal exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from fastdeit.cli.commands import app
from fastdeit.runtime.distributed import SINGLE, World, eval_rows
from fastdeit.runtime.launch import _port_free

from tiny import TINY_MODEL, TINY_RUN

# The tiny run with augmentation that crosses samples (mixup/cutmix partners, repeated
# augmentation) and a val split that does not divide into eval batches × ranks. No drop
# path: its masks come from each rank's own RNG stream (see the README).
COMMON = [*TINY_RUN, *TINY_MODEL, "--model", "deit_tiny_distilled", "--epochs", "2", "--set", "run.log_every=1",
          "--set", "aug.mixup=0.8", "--set", "aug.cutmix=1.0", "--set", "aug.reprob=0.25",
          "--set", "aug.repeated_aug=3", "--set", "aug.rand_augment=rand-m9-mstd0.5-inc1",
          "--set", "model.drop_path=0.0", "--set", "data.eval_batch_size=4", "--set", "run.ckpt_every=2"]


def fastdeit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed command in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-c", "from fastdeit.cli.commands import run_app; run_app()", *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def steps(run: Path) -> dict[tuple[int, int], float]:
    """The loss of every (epoch, step); where a restart logged a step twice, the last wins."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["epoch"], r["step"]): r["loss"] for r in recs if r["kind"] == "step"}


def records(run: Path, kind: str) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """One process and two, hard distillation from a live (random) convnet teacher."""
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), root / "teacher.pth")
    COMMON.extend(["--distill", "hard", "--teacher", "resnet10t", "--teacher-ckpt", str(root / "teacher.pth")])
    one = CliRunner().invoke(app, ["train", *COMMON, "--data", str(tiny_data), "--out", str(root / "one")])
    assert one.exit_code == 0, one.output
    two = fastdeit("train", *COMMON, "--data", str(tiny_data), "--out", str(root / "two"), "--gpus", "0",
                   "--procs", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout.strip().splitlines()[-1])["top1"] is not None  # rank 0's summary line
    return {"one": root / "one", "two": root / "two", "root": root}


def test_two_processes_train_like_one(runs):
    a, b = steps(runs["one"]), steps(runs["two"])
    assert len(a) == 8 and a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]) < 1e-5, key
    pa = torch.load(runs["one"] / "checkpoint-last.pt", weights_only=True)["model"]
    pb = torch.load(runs["two"] / "checkpoint-last.pt", weights_only=True)["model"]
    assert pa.keys() == pb.keys()  # DDP's "module." prefix never reaches a checkpoint
    worst = max(float((pa[k] - pb[k]).abs().max()) for k in pa)
    assert 0 <= worst < 1e-5


def test_compiled_ddp_trains_like_eager_ddp(runs, tiny_data):
    """--compile compiles the DDP wrapper (Dynamo splits the graph at DDP's buckets): the
    epoch-0 losses of the eager two-process run, to 1e-4 (the warm-up lr does not depend on
    the number of epochs)."""
    out = runs["root"] / "compiled"
    res = fastdeit("train", *COMMON, "--data", str(tiny_data), "--out", str(out), "--gpus", "0", "--procs", "2",
                   "--compile", "default", "--epochs", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    eager, compiled = steps(runs["two"]), steps(out)
    assert len(compiled) == 4
    for key, loss in compiled.items():
        assert abs(loss - eager[key]) < 1e-4, key


def test_under_a_users_torchrun_each_process_is_one_rank(runs, tiny_data):
    """`torchrun ... -m fastdeit.cli.commands train ...` (or a scheduler setting RANK/WORLD_SIZE): no
    second launch, each process trains as its rank, as fastdeit's own launch does."""
    out = runs["root"] / "torchrun"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fastdeit.cli.commands", "train", *COMMON, "--data", str(tiny_data), "--out", str(out),
                          "--epochs", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len([ln for ln in res.stdout.splitlines() if ln.startswith("{")]) == 1  # rank 0's summary only
    mine, theirs = steps(runs["two"]), steps(out)
    assert len(theirs) == 4 and all(abs(loss - mine[key]) <= 1e-6 for key, loss in theirs.items())


def test_the_run_folder_is_written_once_by_rank_0(runs):
    run = runs["two"]
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint-last.pt",
                                               "checkpoint-best.pt", "summary.json"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["epoch"], r["step"]) for r in lines if r["kind"] == "step"]
    assert len(keys) == len(set(keys)) == 8  # one writer: no step twice
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [0, 1]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["device"] == "cpu" and cfg["run"]["batch_size"] == 16


def test_distributed_eval_equals_single_process_eval(runs, tiny_data):
    summary = json.loads((runs["two"] / "summary.json").read_text())
    res = CliRunner().invoke(app, ["eval", "--data", str(tiny_data), "--ckpt", str(runs["two"] / "checkpoint-last.pt"),
                                   "--workers", "0", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    single = json.loads(res.stdout.strip().splitlines()[-1])
    assert single["images"] == 18
    assert summary["top1"] == single["top1"] and summary["top5"] == single["top5"]  # exactly


def test_a_killed_worker_group_restarts_from_its_checkpoint(runs, tiny_data):
    out = runs["root"] / "killed"
    # Rank 1 is SIGKILLed after update 7 (epoch 1, step 2 of 4); the last checkpoint is from update 6.
    res = fastdeit("train", *COMMON, "--data", str(tiny_data), "--out", str(out), "--gpus", "0", "--procs", "2",
                   "--max-restarts", "1", env={"FASTDEIT_KILL_AT": "7"})
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = records(out, "resume")
    assert [(r["epoch"], r["step"]) for r in resumed] == [(1, 2)]
    a, b = steps(runs["two"]), steps(out)
    assert a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]) <= 1e-6, key
    ea, eb = records(runs["two"], "epoch")[-1], records(out, "epoch")[-1]
    assert ea["top1"] == eb["top1"] and ea["top5"] == eb["top5"]


def test_without_restarts_a_killed_worker_fails_with_one_line(tiny_data, tmp_path):
    res = fastdeit("train", *COMMON, "--data", str(tiny_data), "--out", str(tmp_path / "r"), "--gpus", "0",
                   "--procs", "2", env={"FASTDEIT_KILL_AT": "1"})
    assert res.returncode == 2
    assert "worker rank 1 failed" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "r" / "config.json").exists()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_rows_split_whole_batches(world):
    n, batch = 18, 4
    parts = [eval_rows(n, batch, World(r, world)) for r in range(world)]
    if world == 1:
        assert parts == [None]
        return
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    for part in parts:  # every rank's batches are batches of the single-process order
        for k in range(0, len(part), batch):
            chunk = part[k:k + batch]
            assert chunk[0] % batch == 0 and list(chunk) == list(range(chunk[0], chunk[0] + len(chunk)))
    assert eval_rows(n, batch, SINGLE) is None


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from fastdeit.config.recipes import recipe
    from fastdeit.config.schema import ModelConfig, with_section
    from fastdeit.models.factory import build_model
    from fastdeit.training.step import Prepared, make_step

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="deit_tiny_distilled", patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                    drop_path=0.0), 5, 32)
    net = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True) if world > 1 else model
    step = make_step(with_section(recipe("deit"), "distill", mode="hard"), torch.device("cpu"), None, 5, model=net,
                     optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    g = torch.Generator().manual_seed(1)
    per = 8 // world
    grads = []
    for k in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.softmax(torch.randn(8, 5, generator=g), 1)
        t = torch.randint(0, 5, (8,), generator=g)
        rows = slice(rank * per, (rank + 1) * per)
        step.update(Prepared(x[rows], y[rows], t[rows], plan=None, bad=()), k + 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    if rank == 0:
        torch.save({"grads": grads, "params": model.state_dict()}, out)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_and_parameters_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    _ddp_worker(0, 1, 0, str(tmp_path / "one.pt"))
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two.pt")), nprocs=2, join=True)
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    for step, (ga, gb) in enumerate(zip(one["grads"], two["grads"])):
        for name in ga:
            scale = float(ga[name].abs().max()) or 1.0
            assert float((ga[name] - gb[name]).abs().max()) <= 1e-5 * scale, (step, name)
    for name, p in one["params"].items():
        assert torch.allclose(p, two["params"][name], atol=1e-5), name


def _one_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return res.output


@pytest.mark.parametrize("flags, words", [
    (["--gpus", "2"], "CUDA GPU"),
    (["--procs", "2"], "go with --gpus"),
    (["--max-restarts", "2"], "go with --gpus"),
    (["--gpus", "0", "--procs", "3"], "does not split into 3 ranks"),
    (["--gpus", "0", "--procs", "2", "--device", "cuda"], "contradicts"),
    (["--gpus", "0", "--procs", "2", "--nodes", "2"], "--rdzv-endpoint"),
    (["--gpus", "0", "--procs", "2", "--nodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank 2"),
    (["--gpus", "0", "--procs", "2", "--nodes", "2", "--rdzv-endpoint", "nohostport"], "HOST:PORT"),
])
def test_launch_errors_are_one_line(tiny_data, tmp_path, flags, words):
    if flags[:2] == ["--gpus", "2"] and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    res = CliRunner().invoke(app, ["train", *TINY_RUN, "--data", str(tiny_data), "--model", "deit_tiny",
                                   "--out", str(tmp_path / "r"), *flags])
    assert words in _one_line(res)
    assert not (tmp_path / "r").exists()  # nothing started, nothing written


def test_a_port_in_use_is_named(tiny_data, tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        res = CliRunner().invoke(app, ["train", *TINY_RUN, "--data", str(tiny_data), "--model", "deit_tiny",
                                       "--out", str(tmp_path / "r"), "--gpus", "0", "--procs", "2", "--nodes", "2",
                                       "--rdzv-endpoint", f"127.0.0.1:{port}"])
    assert f"port {port} is in use" in _one_line(res)


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(runs, tiny_data):
    """A scheduler signals one process: the ranks agree on the stop at a step boundary, rank 0
    saves, every rank exits cleanly, the launcher reports a stop (exit 3), not a failure, and
    the resumed run ends with the losses of an uninterrupted one."""
    out = runs["root"] / "termed"
    res = fastdeit("train", *COMMON, "--data", str(tiny_data), "--out", str(out), "--gpus", "0", "--procs", "2",
                   env={"FASTDEIT_TERM_AT": "5"})
    assert res.returncode == 3, res.stderr[-3000:]
    assert "lost contact" not in res.stderr and "failed" not in res.stderr and "continue with --resume" in res.stderr
    stop = records(out, "stop")
    assert len(stop) == 1 and stop[0]["updates"] in (6, 7)  # the vote of step 5 is read at step 6's boundary
    res = fastdeit("train", *COMMON, "--data", str(tiny_data), "--out", str(out), "--gpus", "0", "--procs", "2",
                   "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = steps(runs["two"]), steps(out)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 for k in a)


def test_two_nodes_on_one_machine_train_like_one_process(runs, tiny_data):
    """Two launchers on 127.0.0.1, each one node of one CPU process, joined by the c10d
    rendezvous (what `--nodes 2` does across machines sharing the run folder)."""
    out, port = runs["root"] / "nodes", _free_port()
    args = ["-c", "from fastdeit.cli.commands import run_app; run_app()", "train", *COMMON, "--data", str(tiny_data),
            "--out", str(out), "--gpus", "0", "--procs", "1", "--nodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    def node(rank: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *args, "--node-rank", str(rank)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    # node 1 first: on the endpoint's machine it must wait for node 0's store, never take its port
    nodes = [node(1)]
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and nodes[0].poll() is None:
            assert _port_free(port), "node 1 took the rendezvous port that node 0 hosts"
            time.sleep(0.2)
        nodes.insert(0, node(0))
        results = [n.communicate(timeout=600) for n in nodes]
    finally:
        for n in nodes:  # a failed check leaves no launcher waiting for its peer
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], [r[1][-2000:] for r in results]
    a, b = steps(runs["one"]), steps(out)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def _accum_worker(rank: int, world: int, port: int, out: str, accum: int) -> None:
    """Two updates of a DDP student with `accum` micro-batches; counts DDP's all-reduces."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from fastdeit.config.recipes import recipe
    from fastdeit.config.schema import ModelConfig, with_section
    from fastdeit.models.factory import build_model
    from fastdeit.training.step import Prepared, make_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="deit_tiny_distilled", patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                    drop_path=0.0), 5, 32)
    net = torch.nn.parallel.DistributedDataParallel(model)
    calls = []
    net.register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(dist.group.WORLD, bucket))
    cfg = with_section(with_section(recipe("deit"), "distill", mode="hard"), "run", accum_steps=accum)
    step = make_step(cfg, torch.device("cpu"), None, 5, model=net, optimizer=torch.optim.AdamW(model.parameters()))
    g = torch.Generator().manual_seed(1)
    for k in range(2):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.softmax(torch.randn(8, 5, generator=g), 1)
        t = torch.randint(0, 5, (8,), generator=g)
        rows = slice(rank * 4, (rank + 1) * 4)
        step.update(Prepared(x[rows], y[rows], t[rows], plan=None, bad=()), k + 1)
    if rank == 0:
        torch.save({"calls": len(calls), "params": model.state_dict()}, out)
    dist.destroy_process_group()


def test_accumulation_all_reduces_once_per_update_and_trains_like_one_batch(tmp_path):
    """--accum-steps K under DDP: no all-reduce on the first K - 1 micro-batches (no_sync), and
    the parameters of K = 1, to float32 rounding."""
    import torch.multiprocessing as mp

    for accum in (1, 2):
        mp.spawn(_accum_worker, args=(2, _free_port(), str(tmp_path / f"{accum}.pt"), accum), nprocs=2, join=True)
    one, two = (torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in (1, 2))
    assert two["calls"] == one["calls"] > 0  # the same number of bucket all-reduces: once per update
    assert all(torch.allclose(p, two["params"][n], atol=1e-5) for n, p in one["params"].items())


def test_without_mixing_a_rank_needs_no_whole_mix_group(tiny_data, tmp_path):
    """Mix groups of 16 with mixup and cutmix off (as the demo recipe has them): two ranks of 8
    train as one process does, where the whole-groups rule used to refuse the batch."""
    args = [*TINY_RUN, *TINY_MODEL, "--model", "deit_tiny", "--data", str(tiny_data), "--set", "aug.mix_group=16",
            "--set", "run.log_every=1", "--set", "model.drop_path=0.0"]
    two = fastdeit("train", *args, "--out", str(tmp_path / "two"), "--gpus", "0", "--procs", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    one = fastdeit("train", *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)


@pytest.mark.parametrize(("visible", "local_rank", "want"), [(8, 3, 3), (1, 3, 0), (2, 3, None)])
def test_each_rank_takes_its_gpu_however_the_scheduler_shows_them(monkeypatch, visible, local_rank, want):
    """torchrun shows every rank all the node's GPUs (LOCAL_RANK picks one); a scheduler that
    sets CUDA_VISIBLE_DEVICES per task shows each rank only its own, where set_device(LOCAL_RANK)
    failed for every rank but the first. The process group is bound to that GPU (device_id)."""
    import importlib

    from torch.distributed import HashStore

    from fastdeit.errors import UserError
    from fastdeit.runtime import distributed as fdist

    rdzv = importlib.import_module("torch.distributed.rendezvous")  # the module; the package exports a function
    chosen, group = [], {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(fdist.dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(fdist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(fdist.dist, "init_process_group", lambda backend, **kw: group.update(kw, backend=backend))
    monkeypatch.setattr(rdzv, "rendezvous", lambda *a, **kw: iter([(HashStore(), local_rank, 16)]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(visible)))
    for name, value in (("RANK", local_rank), ("WORLD_SIZE", 16), ("LOCAL_RANK", local_rank)):
        monkeypatch.setenv(name, str(value))
    if want is None:
        with pytest.raises(UserError, match="LOCAL_RANK is 3 but this process sees 2 GPUs"):
            fdist.init_from_env("cuda")
        return
    world = fdist.init_from_env("cuda")
    assert fdist.cuda_index(world) == want and chosen == [want]
    assert group["backend"] == "nccl" and group["device_id"] == torch.device("cuda", want)
