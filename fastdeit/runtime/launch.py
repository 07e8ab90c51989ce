"""How `fastdeit train` runs: as one process, as one rank under a user's torchrun, or as a
worker group this process starts through torchrun (`--gpus N`); and the worker itself.

For a worker group the CLI resolves the config, writes it to RUN/config.json and hands torchrun (elastic launch:
`--standalone` on one machine, c10d rendezvous across machines) the command
`python -m fastdeit.runtime.launch RUN/config.json [--resume PATH]`. Workers read that file, not the
CLI's flags, so every rank trains the very same config. A worker group that torchrun restarts
(`--max-restarts`) resumes from RUN/checkpoint-last.pt, on the same plan stream.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from rich.console import Console

from fastdeit.config.schema import TrainConfig, load_json, per_rank_batch, save_json
from fastdeit.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_REQUEUE, EXIT_STOPPED, Requeue, Stopped, UserError
from fastdeit.runtime.atomic import atomic_write_text
from fastdeit.runtime.distributed import World, in_torchrun
from fastdeit.runtime.relay import Relay
from fastdeit.runtime.signals import StopSignal, die_with_parent, exit_after_work, ignore_stops_at_exit, say
from fastdeit.training.rundir import RunDir

SUMMARY_KEYS = ("top1", "top5", "train_img_s", "wall_s")  # the summary line a run prints on stdout


@dataclass(frozen=True)
class Topology:
    """How many workers, where: `gpus` per node (0: CPU workers, `procs` of them)."""

    gpus: int
    procs: int = 1
    nodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    max_restarts: int = 0

    @property
    def per_node(self) -> int:
        return self.gpus if self.gpus > 0 else self.procs

    @property
    def world(self) -> int:
        return self.per_node * self.nodes

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


def topology(gpus: int | None, procs: int = 1, nodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
             max_restarts: int = 0, device: str | None = None) -> Topology | None:
    """The worker topology the train command's flags ask for; None for one plain process."""
    if gpus is None:
        if procs != 1 or nodes != 1 or rdzv_endpoint or max_restarts:
            raise UserError("--procs, --nodes, --rdzv-endpoint and --max-restarts go with --gpus N "
                            "(use --gpus 0 for CPU workers)")
        return None
    topo = Topology(gpus=gpus, procs=procs, nodes=nodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                    max_restarts=max_restarts)
    if device not in (None, "auto", topo.device):
        raise UserError(f"--device {device} contradicts --gpus {gpus} (which means {topo.device}): drop one")
    return topo


def start(cfg: TrainConfig, topo: Topology | None, resume: str | None, console: Console) -> dict[str, Any] | None:
    """`fastdeit train` in its launch mode: one rank of a torchrun group when this process was
    started by one; a worker group through torchrun for `--gpus N` (more than one worker, more
    than one node, or restarts); else one plain process. `resume`: a checkpoint path, or
    `auto` (the flag alone). Returns the summary where this process holds it (None when the
    workers printed it)."""
    from fastdeit.training.trainer import train

    path = RunDir(cfg.run.out).resume_path(resume, console)
    again = resume == "auto" and path is None  # nothing saved yet: (re)start in the folder
    if in_torchrun():
        return run_worker(cfg, path, again=again)
    if topo is not None:
        check(topo, cfg)
        if topo.world > 1 or topo.nodes > 1 or topo.max_restarts > 0:
            launch(cfg, topo, path, console, again)  # rank 0 prints the summary line
            return None
    return train(cfg, console, resume=path, again=again)


def check(topo: Topology, cfg: TrainConfig, training: bool = True) -> None:
    """Every mistake that can be seen before a process starts, as one line."""
    if topo.gpus < 0 or topo.procs < 1 or topo.nodes < 1 or topo.max_restarts < 0:
        raise UserError("--gpus must be >= 0, --procs, --nodes >= 1 and --max-restarts >= 0")
    if topo.gpus > 0 and topo.procs != 1 and topo.procs != topo.gpus:
        raise UserError("--procs counts CPU workers and goes with --gpus 0; with GPUs there is one worker per GPU")
    if topo.gpus > 0:
        visible = torch.cuda.device_count()
        if topo.gpus > visible:
            raise UserError(f"--gpus {topo.gpus}: this machine shows {visible} CUDA GPU(s)"
                            + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                               if "CUDA_VISIBLE_DEVICES" in os.environ else "") + f": use --gpus {visible} or fewer"
                            + (", or --gpus 0 --procs P for CPU workers" if visible == 0 else ""))
        if not torch.distributed.is_nccl_available() and topo.world > 1:
            raise UserError("this torch build has no NCCL, which multi-GPU training needs: install a CUDA build "
                            "of torch, or train on CPU workers with --gpus 0 --procs P")
    if not 0 <= topo.node_rank < topo.nodes:
        raise UserError(f"--node-rank {topo.node_rank} is not in 0..{topo.nodes - 1} (--nodes {topo.nodes})")
    if topo.nodes > 1 and not topo.rdzv_endpoint:
        raise UserError("--nodes > 1 needs --rdzv-endpoint HOST:PORT, an address of node 0 that every node reaches")
    if topo.rdzv_endpoint:
        host, _, port = topo.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--rdzv-endpoint {topo.rdzv_endpoint!r} is not HOST:PORT (e.g. node0.cluster:29500)")
        if topo.node_rank == 0 and _is_local(host) and not _port_free(int(port)):
            raise UserError(f"port {port} is in use on this machine: pick another --rdzv-endpoint port "
                            f"(and use it on every node)")
    if training:  # a global batch that does not split is an error here, not in N workers
        per_rank_batch(cfg, topo.world)


def _is_local(host: str) -> bool:
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return False
    return addr.startswith("127.") or host in (socket.gethostname(), socket.getfqdn()) \
        or addr == socket.gethostbyname(socket.gethostname())


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def torchrun_args(topo: Topology, config: Path, resume: Path | None, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["--nproc-per-node", str(topo.per_node), "--max-restarts", str(topo.max_restarts)]
    if topo.nodes == 1 and not topo.rdzv_endpoint:
        args.append("--standalone")  # a free local port, no endpoint to configure
    else:
        args += ["--nnodes", str(topo.nodes), "--node-rank", str(topo.node_rank), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", str(topo.rdzv_endpoint), "--rdzv-id", f"fastdeit-{config.parent.name}",
                 # node 0 hosts the store, always: torch's guess from host names lets whichever node on
                 # the endpoint's machine starts first take the port (and node 0 then finds it taken)
                 "--rdzv-conf", f"is_host={int(topo.node_rank == 0)}"]
    return [*args, "--module", "fastdeit.runtime.launch", str(config), *(["--resume", str(resume)] if resume else []),
            *extra]


def launch(cfg: TrainConfig, topo: Topology, resume: Path | None, console: Console, again: bool = False) -> None:
    """Write RUN/config.json and run the worker group to its end; UserError when it failed.
    The caller has run `check(topo, cfg)`. Node 0 holds the run folder for its workers."""
    run_dir = RunDir(cfg.run.out)
    with run_dir.hold() if topo.node_rank == 0 else contextlib.nullcontext():
        if topo.node_rank == 0:  # node 0 owns the run folder (shared storage); the others may start later
            run_dir.check_start(resume, again)  # before config.json is written over
        run_dir.create()
        run_dir.write_config(cfg)  # every node writes the same file: each node's workers read it
        console.print(f"config: {run_dir.config}")
        # Node 0 holds the folder for every rank: the rendezvous may make any node's worker rank 0.
        held = {RunDir.HELD: str(run_dir.root.resolve())}
        _run_group(topo, torchrun_args(topo, run_dir.config, resume), console, cfg.run.requeue_signal, run_dir,
                   held)


def _run_group(topo: Topology, args: list[str], console: Console, requeue: str, run_dir: RunDir | None = None,
               env: dict[str, str] | None = None) -> None:
    """torchrun with these arguments, to the group's end; a failure is one UserError, a stop
    (whoever received the signal: this process, the workers or both) Stopped or Requeue."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    console.print(f"launching {topo.world} {'GPU' if topo.gpus else 'CPU'} workers "
                  f"({topo.nodes} node(s) x {topo.per_node}) through torchrun")
    # torchrun would set 1 thread per worker (and say so); share the machine's cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // topo.per_node)))
    # torchrun's own failure report is a traceback per worker; ours is one line below.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic.multiprocessing.errors").setLevel(logging.CRITICAL)
    relay = Relay(requeue)
    try:
        with _environ(env or {}):
            relay.run_agent(args)
        if relay.at_once is not None:
            raise KeyboardInterrupt
        if run_dir and (last := run_dir.last_record()) and last.get("kind") == "stop":  # stopped on request
            raise run_dir.stop_error(last)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if relay.at_once is not None or codes <= {EXIT_INTERRUPTED}:
            raise KeyboardInterrupt from None  # stopped at once, as asked: the last checkpoint is kept
        # cache-teacher workers that stopped on request (the first to exit makes torchrun end the
        # others with SIGTERM, which may reach one as it leaves)
        if codes & {EXIT_STOPPED, EXIT_REQUEUE} and codes <= {0, EXIT_STOPPED, EXIT_REQUEUE, -signal.SIGTERM}:
            raise (Requeue if EXIT_REQUEUE in codes else Stopped)(
                "stopped on request; the shards written are kept: run the same command again to continue") from None
        if codes == {EXIT_BAD_INPUT}:  # the workers named the problem themselves
            raise UserError("the workers stopped: see the worker's message above") from None
        first, failure = e.get_first_failure()
        again = "continue the run with --resume" if run_dir else "run the same command again to continue"
        raise UserError(f"worker rank {first} failed with exit code {failure.exitcode} (its output is above); "
                        f"{again}") from None


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """These environment variables for the workers started within (restored after: the CLI
    may run in a test's process)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_cache_teacher(cfg: TrainConfig, topo: Topology | None, mode: str, out: Path,
                        console: Console) -> dict[str, Any] | None:
    """`fastdeit cache-teacher` in its launch mode (as `start` for train): one rank under
    torchrun, a worker group for `--gpus N` with more than one worker, else one process.
    The workers read the resolved config from OUT/cache-teacher-config.json."""
    from fastdeit.distill.cache_build import cache_teacher

    if topo is not None and topo.world > 1 and not in_torchrun():
        check(topo, cfg, training=False)
        out.mkdir(parents=True, exist_ok=True)
        config = out / "cache-teacher-config.json"
        atomic_write_text(save_json(cfg), config)
        try:
            _run_group(topo, torchrun_args(topo, config, None, ("--cache-teacher", mode, "--out", str(out))),
                       console, cfg.run.requeue_signal)
        finally:
            config.unlink(missing_ok=True)  # the cache holds its rows and manifest only
        return None
    with StopSignal(lambda _: say("stopping after the shard being written (Ctrl-C again to stop at once)"),
                    cfg.run.requeue_signal):
        return run_cache_worker(cfg, mode, out) if in_torchrun() else cache_teacher(cfg, mode, out, 0, console)


def run_cache_worker(cfg: TrainConfig, mode: str, out: Path) -> dict[str, Any] | None:
    """One rank of a cache-teacher worker group: its share of the shards. Rank 0's result."""
    from fastdeit.distill.cache_build import cache_teacher

    with _rank(cfg) as (world, console):
        result = cache_teacher(cfg, mode, out, 0, console, world)
    return result if world.is_main else None


def run_worker(cfg: TrainConfig, resume: Path | None, stop: StopSignal | None = None,
               again: bool = False) -> dict | None:
    """One rank of a torchrun worker group: join the process group, train, leave. Returns the
    summary on rank 0, None on the others; only rank 0 prints."""
    from fastdeit.training.trainer import train

    with _rank(cfg) as (world, console):
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        last = RunDir(cfg.run.out).last
        if restarted:
            resume = last if last.exists() else resume
            console.print(f"worker group restarted: resuming from {resume or 'the start'}")
        summary = train(cfg, console, world, resume, restarted=restarted, on_step=_fault_hooks(world), stop=stop,
                        again=again)
    return summary if world.is_main else None


@contextlib.contextmanager
def _rank(cfg: TrainConfig) -> Iterator[tuple[World, Console]]:
    """This process as one rank of torchrun's group (left on the way out), with a console
    that only rank 0 prints to."""
    from fastdeit.runtime.distributed import init_from_env, shutdown

    device = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        world = init_from_env(device)
        yield world, Console(stderr=True, soft_wrap=True, markup=False, highlight=False, quiet=not world.is_main)
    finally:
        shutdown()


def _fault_hooks(world: World) -> list:
    """For the fault-tolerance tests only: FASTDEIT_KILL_AT=N kills the last rank (SIGKILL, as
    a crashed machine would), FASTDEIT_TERM_AT=N sends it SIGTERM (as a scheduler preempting
    one process would), after update N, on the first attempt of a torchrun group. Read once
    here: a normal run's steps carry no hook at all."""
    hooks = []
    first = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    for var, sig in (("FASTDEIT_KILL_AT", signal.SIGKILL), ("FASTDEIT_TERM_AT", signal.SIGTERM)):
        at = os.environ.get(var)
        if at and world.rank == world.size - 1 and first:
            hooks.append(lambda updates, at=int(at), sig=sig: updates == at and os.kill(os.getpid(), sig))
    return hooks


def worker_main(argv: list[str] | None = None) -> int:
    """`python -m fastdeit.runtime.launch RUN/config.json [--resume PATH]`: what torchrun starts. The
    stop signals are watched from here on (fastdeit's launcher starts workers with them
    blocked, so none is lost or fatal before this point)."""
    p = argparse.ArgumentParser(prog="python -m fastdeit.runtime.launch")
    p.add_argument("config", type=Path)
    p.add_argument("--resume", type=Path, default=None)
    p.add_argument("--cache-teacher", default=None, metavar="MODE", help="build a teacher cache instead of training")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    die_with_parent()  # a launcher killed with kill -9 must not leave ranks writing into the run folder
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_json(a.config)
        # The launcher (runtime/relay.py) says what a stop does, once for the group: its ranks keep quiet.
        with StopSignal(requeue=cfg.run.requeue_signal, quiet=True) as stop:
            if a.cache_teacher:
                result = run_cache_worker(cfg, a.cache_teacher, a.out)
                if result is not None:
                    print(json.dumps(result))
                return 0
            summary = run_worker(cfg, a.resume, stop)
    except Stopped as e:  # every rank stopped after the same step; the launcher says so
        # A training group leaves 0 (torchrun restarts no stop; the launcher reads the stop
        # record); a cache group's code says it.
        return (EXIT_REQUEUE if isinstance(e, Requeue) else EXIT_STOPPED) if a.cache_teacher else 0
    except KeyboardInterrupt:  # a second signal: at once, the last checkpoint kept (the launcher says so)
        return EXIT_INTERRUPTED
    except UserError as e:  # every rank says it: a rank may fail alone (its own files, its own GPU)
        print(f"error: {e}" if rank == 0 else f"[rank {rank}] error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (torch.distributed.DistError, RuntimeError) as e:
        if not _lost_peer(e):
            raise  # a bug: its traceback is wanted
        # Another rank died (torchrun names it); this one's traceback would only hide that.
        print(f"[rank {rank}] lost contact with another rank: {str(e).splitlines()[0][:160]}", file=sys.stderr)
        return 1
    if summary is not None:
        print(json.dumps({k: summary[k] for k in SUMMARY_KEYS}))
    return 0


def _lost_peer(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.distributed.DistError) or any(
        w in text for w in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL error"))


def main() -> NoReturn:
    """A rank's process: its work, then its exit code, whatever stop arrives while it ends
    (torchrun would report a rank's death by SIGTERM as a failed group)."""
    ignore_stops_at_exit()
    exit_after_work(worker_main())


if __name__ == "__main__":
    main()
