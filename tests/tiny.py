"""Settings of the tiny runs the tests make (seconds per epoch on a CPU), and loading a benchmark script."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from fastdeit.data.synthetic import SyntheticSet

ROOT = Path(__file__).resolve().parents[1]

TINY_SET = SyntheticSet(classes=3, train_per_class=24, val_per_class=6, seed=7)

# A 2-block DeiT at 32 px.
TINY_MODEL = ["--set", "model.depth=2", "--set", "model.embed_dim=32", "--set", "model.num_heads=2",
              "--set", "model.patch_size=8"]
TINY_RUN = ["--recipe", "demo", "--img-size", "32", "--batch-size", "16", "--epochs", "1",
            "--set", "data.workers=0", "--set", "run.progress=false", "--set", "aug.mix_group=8",
            "--set", "data.eval_batch_size=32", "--set", "run.eval_every=1"]


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (the scripts are not a package; they import their
    siblings as a script does, from the folder they are in)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
