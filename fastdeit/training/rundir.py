"""The run folder and the checkpoint format: the one module that names run files and reads
checkpoints back (writing them atomically through runtime/atomic.py).

A run folder (`run.out`):

    config.json          the resolved config; the workers of a multi-process run read it
    metrics.jsonl        one JSON object per logged step, per epoch and per resume (appended)
    checkpoint-last.pt   the training state (CHECKPOINT_FORMAT below), every epoch and every
                         `run.ckpt_every` steps
    checkpoint-best.pt   a copy of the last checkpoint at the best joint top-1 so far
    summary.json         the run's final numbers
    teacher-labelmap/    label maps built for the run when no `distill.teacher_cache` was given
    .lock                while a run uses the folder: who holds it (`RunDir.hold`)

Every file is written under a temporary name and renamed (`atomic.atomic_write`), so a crash never
leaves a torn file (and the next run to hold the folder removes what a killed one was writing).
Checkpoints are read with `weights_only=True`: a file cannot run code.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import pickle
import shutil
import socket
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fastdeit import __version__
from fastdeit.config.schema import ModelConfig, TrainConfig, save_json
from fastdeit.data.plan import PlanSpec
from fastdeit.errors import Requeue, Stopped, UserError, differences
from fastdeit.models.folders import load_safetensors, read_model_folder
from fastdeit.runtime.atomic import atomic_save, atomic_write, atomic_write_text, write_failed
from fastdeit.runtime.signals import REQUEUE

CHECKPOINT_FORMAT = 1  # bump when the layout of a training checkpoint changes
# What a training checkpoint holds besides the state dicts of the run's components.
_CHECKPOINT_KEYS = ("format", "meta", "config", "state", "rng")


class RunDir:
    """A run folder: its file names, the existing-run check, and the writes into it."""

    NAMES = ("config.json", "metrics.jsonl", "checkpoint-last.pt", "checkpoint-best.pt", "summary.json", ".lock",
             "checkpoint-diverged.pt")
    HELD = "FASTDEIT_RUN_HELD"  # set by a launcher for its workers: the folder it holds for them

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "config.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    last = property(lambda self: self.root / "checkpoint-last.pt")
    best = property(lambda self: self.root / "checkpoint-best.pt")
    summary = property(lambda self: self.root / "summary.json")
    labelmap_cache = property(lambda self: self.root / "teacher-labelmap")
    diverged = property(lambda self: self.root / "checkpoint-diverged.pt")  # the state when the loss diverged

    def check_start(self, resume: Path | None, again: bool = False) -> None:
        """A run starts in a folder (or a file path) that holds no run yet, or continues its
        own: never written over, never mixed with another run's files. `again`: `--resume`
        found no checkpoint; a run of this folder killed before its first one starts over in
        it (its metrics.jsonl is appended to: a step's last record is the one that counts)."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root} is a file, not a run folder: pick another --out")
        existing = next((p.name for p in (self.last, self.metrics) if p.exists()), None)
        if existing is None or (again and not self.last.exists()):
            return
        if resume is None:
            raise UserError(f"{self.root} already holds a run ({existing}): continue it with --resume, "
                            f"or pick another --out")
        if Path(resume).resolve().parent != self.root.resolve():
            raise UserError(f"--resume {resume} is another folder's checkpoint, and {self.root} already holds a "
                            f"run ({existing}) that continuing would write over: pick an empty --out to continue "
                            f"that run there, or resume {self.last}")

    def held_by_launcher(self) -> bool:
        """Whether fastdeit's launcher holds the folder for this process (and checked it)."""
        return os.environ.get(self.HELD) == str(self.root.resolve())

    @contextmanager
    def hold(self) -> Iterator[None]:
        """This run uses the folder: another run into it is refused (one line) while this one
        lives. The lock is the kernel's (a POSIX record lock on `.lock`), so a run killed even
        with SIGKILL leaves none behind, and worker processes it forks do not inherit it. What
        killed writers left half-written (`*.tmp`) is removed; a folder made here that is
        still empty when the block ends (bad input) is removed again."""
        if self.held_by_launcher():
            yield
            return
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root} is a file, not a run folder: pick another --out")
        made = not self.root.exists()
        try:
            self.create()
        except OSError as e:
            raise UserError(f"cannot create the run folder {self.root}: {e.strerror}") from None
        fd = self._lock()
        try:
            for tmp in self.root.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            yield
        finally:
            (self.root / ".lock").unlink(missing_ok=True)
            os.close(fd)
            if made and not any(self.root.iterdir()):
                self.root.rmdir()

    def _lock(self) -> int:
        path = self.root / ".lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks: run unguarded
                    return os.open(os.devnull, os.O_RDONLY)
                holder = path.read_text(errors="replace").strip() if path.exists() else "another process"
                raise UserError(f"{self.root} is in use by another run ({holder or 'starting'}): wait for it to "
                                f"end, or pick another --out") from None
            try:  # the holder before us may have removed the file between our open and our lock
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:  # who holds it, for the line another run prints; the lock holds without it (a full disk)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        except OSError:
            pass
        return fd

    def resume_path(self, resume: str | None, console: Console) -> Path | None:
        """The checkpoint `--resume` means: `auto` (the flag alone) is this folder's last
        checkpoint, or a fresh start when there is none yet (a requeued job's first go); a
        run folder means its last checkpoint."""
        if not resume:
            return None
        if resume != "auto" and Path(resume).is_dir():
            if not (Path(resume) / self.last.name).is_file():
                raise UserError(f"--resume {resume} is a folder without {self.last.name}: pass a checkpoint file, "
                                f"or the run folder of a run that saved one")
            return Path(resume) / self.last.name
        if resume != "auto":
            return Path(resume)
        if not self.last.exists():
            console.print(f"--resume: no checkpoint in {self.root} yet; starting the run")
            return None
        return self.last

    def foreign_files(self) -> list[str]:
        """Names in the folder that no run writes (a run never deletes a folder holding them)."""
        if not self.root.exists():
            return []
        ours = {*self.NAMES, self.labelmap_cache.name}
        return [p.name for p in self.root.iterdir() if p.name not in ours and not p.name.endswith(".tmp")]

    def remove(self) -> None:
        """Delete the folder to start its run over; a folder holding any file that no run
        writes is never touched (one line names it)."""
        if not self.root.exists():
            return
        if others := self.foreign_files():
            raise UserError(f"{self.root} holds files that are not a fastdeit run ({others[0]}): pick another --out")
        shutil.rmtree(self.root)

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: TrainConfig, picked: dict[str, str] | None = None) -> None:
        """The resolved config, with the fastdeit version and what the run picked (`picked`:
        loader, attention, compile, teacher) as its provenance."""
        atomic_write_text(save_json(cfg, {"fastdeit": __version__, **(picked or {})}), self.config)

    def log(self, record: dict[str, Any]) -> None:
        """One line appended to metrics.jsonl, whole or not at all: a write cut short (a full
        disk) is undone, so the next record never glues onto half a line."""
        line = memoryview((json.dumps(record) + "\n").encode())
        fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        start = os.fstat(fd).st_size
        try:
            while line:
                line = line[os.write(fd, line):]
        except OSError as e:
            os.ftruncate(fd, start)
            raise UserError(write_failed(self.metrics, e, len(line))) from None
        finally:
            os.close(fd)

    def last_record(self) -> dict[str, Any] | None:
        """The last record of metrics.jsonl (a `stop` record: the run stopped on request)."""
        try:
            lines = self.metrics.read_text().splitlines()
            return json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            return None

    def stop_error(self, record: dict[str, Any]) -> Stopped:
        """The exception a `stop` record ends the command with (exit 3, or 4 for a requeue):
        what training raises, and what a launcher reads back from its workers' run."""
        where = f"at epoch {record['epoch']} step {record['step']}; saved {self.last}"
        if record.get("reason") == REQUEUE:
            return Requeue(f"stopped for a requeue {where}: requeue the job (exit code 4); --resume continues",
                           where)
        return Stopped(f"stopped {where}: continue with --resume", where)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(json.dumps(summary, indent=2), self.summary)

    def save(self, checkpoint: dict[str, Any], best: bool = False) -> None:
        atomic_save(checkpoint, self.last)
        if best:
            atomic_write(self.best, lambda tmp: shutil.copyfile(self.last, tmp))


# --- the checkpoint format ------------------------------------------------------------------

def checkpoint_meta(cfg: TrainConfig, classes: tuple[str, ...], dataset: str | None = None) -> dict[str, Any]:
    """What `fastdeit eval` and a teacher load need to rebuild the model and its eval view,
    and the fingerprint of the training data (a resumed run must train on the same)."""
    m = cfg.model
    return {"model": {"name": m.name, "patch_size": m.patch_size, "depth": m.depth, "embed_dim": m.embed_dim,
                      "num_heads": m.num_heads, "width": m.width},
            "img_size": cfg.data.img_size, "num_classes": len(classes), "classes": list(classes),
            "crop_pct": cfg.data.crop_pct, "dataset": dataset}


def training_checkpoint(cfg: TrainConfig, classes: tuple[str, ...], dataset: str, components: dict[str, dict],
                        state: dict[str, Any], rng: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint: the state dicts of the run's components (model, optimizer,
    scheduler, scaler, EMA; {} where absent), the loop's position, the RNG states."""
    return {"format": CHECKPOINT_FORMAT, "meta": checkpoint_meta(cfg, classes, dataset), "config": cfg.to_dict(),
            **components, "state": state, "rng": rng}


def read_training_checkpoint(path: Path, cfg: TrainConfig, classes: tuple[str, ...], dataset: str) -> dict[str, Any]:
    """A checkpoint this run can continue from: the same model, classes, training data and
    plan, or one line saying what differs."""
    if not Path(path).is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    ck = _load(path)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or any(k not in ck for k in _CHECKPOINT_KEYS):
        raise UserError(f"--resume: {path} is not a fastdeit training checkpoint")
    meta, ours = ck["meta"], checkpoint_meta(cfg, classes, dataset)
    if meta["model"] != ours["model"]:
        raise UserError(f"--resume: {path} is a checkpoint of {meta['model']['name']} {meta['model']}, "
                        f"not of this run's {ours['model']['name']} {ours['model']}")
    if meta["classes"] != ours["classes"]:
        raise UserError(f"--resume: {path} was trained on other classes ({_diff_lists(meta['classes'], classes)}): "
                        f"resume on the data it was trained on, or start a new run with --set model.init={path}")
    if meta.get("dataset") not in (None, dataset):  # checkpoints of older versions carry no fingerprint
        raise UserError(f"--resume: the training data changed since {path} was written (files added, removed or "
                        f"resized): resume on the same data, or start a new run with --set model.init={path}")
    old, new = PlanSpec.from_config(TrainConfig.from_dict(ck["config"])).to_json(), PlanSpec.from_config(cfg).to_json()
    if old != new:
        what = "; ".join(f"{k} {a} in the checkpoint, {b} now" for k, a, b in differences(old, new))
        raise UserError(f"--resume: the checkpoint's augmentation plan differs ({what}): resume with the same "
                        f"seed, batch size, image size and aug settings")
    return ck


def _diff_lists(old: list[str], new: tuple[str, ...]) -> str:
    gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    return (f"{len(old)} in the checkpoint, {len(new)} now" + (f"; gone: {', '.join(gone[:3])}" if gone else "")
            + (f"; new: {', '.join(added[:3])}" if added else "")) if gone or added else "another order"


def model_folder_config(path: Path) -> dict[str, Any] | None:
    """The config.json of a saved model folder (transformers': a model_type; timm's: an
    architecture), else None (a run folder's config.json is fastdeit's sections)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and ("model_type" in config or "architecture" in config) else None


def weights_of(source: Path) -> Path:
    """What a path given as weights means: a file, or a saved model folder, as it is; a run
    folder's best checkpoint (its last when it has no best); a folder holding one .safetensors
    file (`export --format safetensors`), that file."""
    source = Path(source)
    if not source.is_dir() or model_folder_config(source) is not None:
        return source
    if found := [p for p in (RunDir(source).best, RunDir(source).last) if p.is_file()]:
        return found[0]
    if len(found := sorted(source.glob("*.safetensors"))) == 1:
        return found[0]
    if found:
        raise UserError(f"{source} holds {len(found)} .safetensors files ({', '.join(f.name for f in found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}) and no config.json saying what they are: name one")
    raise UserError(f"{source} holds no checkpoint (checkpoint-best.pt or checkpoint-last.pt) and no saved model")


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model weights, meta) from a fastdeit checkpoint or run folder (meta: the model config and
    image size), a saved transformers or timm folder (meta from its config: `model_folders`),
    an official DeiT .pth, a state_dict or safetensors ({})."""
    path = weights_of(Path(path))
    if path.is_dir():
        return read_model_folder(path, model_folder_config(path) or {})
    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist")
    if Path(path).suffix == ".safetensors":
        return load_safetensors(Path(path)), {}
    obj = _load(path, what="weights file")
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} holds no model state_dict")
    meta = obj.get("meta", {}) if isinstance(obj.get("meta"), dict) else {}
    return sd, meta


def read_ema_weights(path: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a fastdeit checkpoint, keyed as the model's own."""
    ema = _load(path, what="weights file")
    ema = ema.get("ema") if isinstance(ema, dict) else None
    if not ema:
        raise UserError(f"{path} holds no EMA weights (train with --set model.ema=true)")
    return {k.removeprefix("module."): v for k, v in ema.items()}


def model_config_of(meta: dict[str, Any], **changes: Any) -> ModelConfig:
    """The ModelConfig a checkpoint's meta describes (fields it does not name keep their defaults)."""
    known = set(ModelConfig.__dataclass_fields__)
    return ModelConfig(**{**{k: v for k, v in meta.get("model", {}).items() if k in known}, **changes})


def _load(path: Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True, its failures as one line. A file holding other
    Python objects is refused outright: loading it would let the file run code."""
    try:
        # argparse.Namespace: the official DeiT training script stores its arguments (plain
        # values) beside the weights; any other object is still refused.
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols would break the one line
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        objects = "Unsupported global" in str(e)  # torch's advice (load with weights_only=False) is never passed on
        if not objects and not zipfile.is_zipfile(path):  # a plain pickle: torch's reader stops at an opcode it
            import pickletools  # does not take (protocol 0, 4, 5) before any object; read them, never run

            try:
                with open(path, "rb") as f:
                    objects = any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4")
                                  for op, _, _ in pickletools.genops(f))
            except Exception:  # not a pickle either (a huge length claimed in it is a MemoryError)
                pass
        if objects:
            raise UserError(f"{path} holds Python objects besides tensors: refused (fastdeit reads tensors only, "
                            f"so that a file cannot run code)") from None
        raise UserError(f"{path} is not a readable {what} (not a torch file)") from None
    except Exception as e:  # torch's reader fails on garbage in many ways (IndexError,
        # KeyError and MemoryError on random bytes besides the usual ones); all mean "not a checkpoint"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable {what} (empty, truncated or not a torch file: {first})") from None
