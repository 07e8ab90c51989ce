"""Where a run's records go besides metrics.jsonl (which stays the source of truth): TensorBoard
event files in RUN/tensorboard/, or Weights & Biases. Rank 0 only; the same scalars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastdeit.errors import UserError


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(x, {tag: value}) of a record: step records at their update, epoch records at epoch + 1."""
    kind = record.get("kind", "")
    x = int(record.get("updates", 0)) if kind == "step" else int(record.get("epoch", 0)) + 1
    skip = ("kind", "epoch", "step", "updates")
    return x, {f"{kind}/{k}": float(v) for k, v in record.items()
               if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log tensorboard needs tensorboard: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict[str, Any]) -> None:
        x, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, x)
        if record.get("kind") != "step":  # epoch ends and stops are on disk at once
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("--log wandb needs wandb: pip install wandb (or use --log tensorboard)") from None
        self.run = wandb.init(project="fastdeit", name=folder.name, dir=str(folder), config=config)

    def write(self, record: dict[str, Any]) -> None:
        x, values = scalars(record)
        if values:
            self.run.log(values, step=x if record.get("kind") == "step" else None)

    def close(self) -> None:
        self.run.finish()


def check_sink(kind: str) -> None:
    """A sink that cannot open is one line before anything starts."""
    import importlib.util

    needs = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if needs and importlib.util.find_spec(needs) is None:
        raise UserError(f"--log {kind} needs {needs}: pip install {needs}")


def open_sinks(kind: str, run_folder: Path, config: dict[str, Any]) -> list:
    if kind == "tensorboard":
        return [TensorBoardSink(run_folder / "tensorboard")]
    if kind == "wandb":
        return [WandbSink(run_folder, config)]
    return []
