"""The Python API, for notebooks and scripts: the code the `fastdeit` command runs, without the
command line. Errors raise `fastdeit.errors.UserError` (one line: what is wrong, what to do)
instead of exiting; a stop on request raises `Stopped`.

    import fastdeit

    cfg = fastdeit.config_from("demo", data="demo-data", model="deit_tiny", out="runs/api", epochs=1)
    summary = fastdeit.train(cfg)               # the run's summary.json, as a dict
    scores = fastdeit.evaluate("runs/api", data="demo-data")
    model = fastdeit.load("runs/api")           # timm's nn.Module, in eval mode

Settings are named as the `train` command's flags (`batch_size=` for `--batch-size`), any
config key through `sets=["section.key=value", ...]`, and a file through `config=`; the order
is recipe < config file < settings < sets, as on the command line. Errors name the arguments
given (`batch_size must be >= 1`), not the flags or config keys they stand for.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from torch import nn

from fastdeit.config.checks import validate
from fastdeit.config.files import apply_config_file
from fastdeit.config.flags import key_flags
from fastdeit.config.recipes import recipe
from fastdeit.config.schema import TrainConfig, apply_overrides, coerce_key, with_section
from fastdeit.errors import Requeue, Stopped, UserError
from fastdeit.models.fetch import is_url, local_weights
from fastdeit.runtime.cache_folder import cache_dir

# The train command's flags by their Python names (--batch-size: batch_size) -> config keys.
SETTINGS = {flag.removeprefix("--").replace("-", "_"): key for key, flag in key_flags("train").items()}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)(?: ([A-Z][A-Z_]*)\b)?")  # --data DIR, --batch-size

F = TypeVar("F", bound=Callable[..., Any])


def in_python_terms(text: str, params: set[str], keys: dict[str, str]) -> str:
    """An error line as a Python caller reads it: the command's flags named as the function's
    parameters (`--data DIR` -> `data=DIR`, `--batch-size` -> `batch_size`), and the config
    keys of the settings given ({key: parameter}) by those settings; other keys stay keys,
    which `sets=` takes."""
    def name(m: re.Match) -> str:
        param = m.group(1).replace("-", "_")
        if param not in params:
            return m.group(0)
        return f"{param}={m.group(2)}" if m.group(2) else param

    if "sets" in params:  # --set model.ema=true -> sets=['model.ema=true']
        text = re.sub(r"(?<![\w-])--set(?: ([\w.]+=[^\s);,]*))?", lambda m: f"sets=['{m.group(1)}']" if m.group(1)
                      else "sets=", text)
    text = _FLAG.sub(name, text)
    for key, param in keys.items():
        text = re.sub(rf"(?<![\w.]){re.escape(key)}(?!\w)", param, text)
    return text


_KINDS = {"int": "an integer", "path": "a path (str or Path)", "str": "a string", "flag": "True or False"}


def argument(name: str, value: Any, kind: str) -> Any:
    """An API argument as `kind` (an integer given as a string of digits is taken, as --set
    takes it); anything else is a UserError naming the argument, never a TypeError later."""
    if kind == "int" and isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    ok = {"int": isinstance(value, int) and not isinstance(value, bool), "path": isinstance(value, str | os.PathLike),
          "str": isinstance(value, str), "flag": isinstance(value, bool)}[kind]
    if not ok:
        raise UserError(f"{name} must be {_KINDS[kind]}, got {value!r}")
    return value


def _python_named(**kinds: str) -> Callable[[F], F]:
    """An API function whose arguments are checked as `kinds` ({name: kind}; None passes where
    it is the default) and whose UserErrors speak of its arguments, not the command's flags."""
    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)
        names = set(sig.parameters) | set(SETTINGS) | {"sets"}  # train(cfg): cfg came from config_from's settings

        @functools.wraps(fn)
        def named(*args: Any, **kwargs: Any) -> Any:
            try:
                try:
                    bound = sig.bind(*args, **kwargs)
                except TypeError as e:
                    raise UserError(f"{fn.__name__}: {e}") from None
                bound.apply_defaults()
                for name, kind in kinds.items():
                    value = bound.arguments[name]
                    if value is not None or sig.parameters[name].default is not None:
                        bound.arguments[name] = argument(name, value, kind)
                return fn(*bound.args, **bound.kwargs)
            except UserError as e:
                keys = {SETTINGS[n]: n for n, v in kwargs.items() if n in SETTINGS and v is not None}
                e.args = (in_python_terms(str(e), names, keys),)
                raise

        return named  # type: ignore[return-value]

    return wrap


def build_train_config(recipe_name: str, flags: dict[str, Any], overrides: list[str],
                       config_file: Path | None = None) -> TrainConfig:
    """The recipe, then a --config file, then the flags given ({config key: value}, None where
    not given), then the --set overrides; validated. The fastdeit cache folder remembers
    measured choices."""
    cfg = recipe(recipe_name)
    if config_file is not None:
        cfg = apply_config_file(cfg, config_file)
    for key, value in {**flags, "run.cache_dir": cache_dir()}.items():
        if value is not None:
            section, name = key.split(".")
            cfg = with_section(cfg, section, **{name: str(value) if isinstance(value, Path) else value})
    cfg = apply_overrides(cfg, overrides)
    for section, name in (("distill", "teacher_ckpt"), ("model", "init")):  # URLs fetched here, once
        if is_url(value := getattr(getattr(cfg, section), name)):
            cfg = with_section(cfg, section, **{name: str(local_weights(value, cache_dir()))})
    if not cfg.data.path:
        raise UserError("--data DIR is required (make one with: fastdeit make-data DIR)")
    if not cfg.run.out:
        raise UserError("--out RUN is required: the run folder to write")
    validate(cfg)
    return cfg


@_python_named(recipe_name="str", config="path")
def config_from(recipe_name: str = "deit", *, config: str | Path | None = None, sets: list[str] | tuple = (),
                **settings: Any) -> TrainConfig:
    """A validated run config: the recipe, a config file, the settings, then `sets`."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise UserError(f"config_from: unknown setting {unknown[0]!r}; settings: {', '.join(sorted(SETTINGS))}; "
                        f"any other config key with sets=['section.key=value']")
    # each value as its key's type (a string converted as --set converts it), errors naming the setting
    flags = {SETTINGS[name]: None if value is None else coerce_key(SETTINGS[name], str(value) if isinstance(
        value, Path) else value, name) for name, value in settings.items()}
    sets = [sets] if isinstance(sets, str) else sets  # one "section.key=value" alone is one, not its letters
    if not isinstance(sets, list | tuple) or not all(isinstance(item, str) for item in sets):
        raise UserError(f"sets must be a list of 'section.key=value' strings, got {sets!r}")
    return build_train_config(recipe_name, flags, sets, Path(config) if config else None)


@_python_named(gpus="int", procs="int")
def train(cfg: TrainConfig, resume: str | Path | None = None, gpus: int | None = None, procs: int = 1,
          console: Console | None = None) -> dict[str, Any] | None:
    """Train `cfg` (from `resume`: a checkpoint, a run folder, or "auto"); the summary. With
    `gpus`, a worker group through torchrun, as `--gpus N` (`gpus=0, procs=P`: CPU workers);
    the summary is then the run folder's summary.json."""
    from fastdeit.runtime.launch import start, topology
    from fastdeit.training.rundir import RunDir

    if not isinstance(cfg, TrainConfig):
        raise UserError(f"train takes a TrainConfig, got {type(cfg).__name__}: build one with "
                        f"fastdeit.config_from(...)")
    if resume is True:  # as --resume alone
        resume = "auto"
    elif resume is not None and resume is not False:
        resume = argument("resume", resume, "path")
    topo = topology(gpus, procs, device=cfg.run.device)
    try:
        summary = start(cfg, topo, str(resume) if resume else None, console or Console(stderr=True))
    except Stopped as e:  # said as a Python caller continues: the same call with resume=True
        kind = "for a requeue " if isinstance(e, Requeue) else ""
        raise type(e)(f"stopped {kind}{e.where}: fastdeit.train(cfg, resume=True) continues", e.where) from None
    if summary is None and RunDir(cfg.run.out).summary.is_file():
        import json

        summary = json.loads(RunDir(cfg.run.out).summary.read_text())
    return summary


@_python_named(weights="path", data="path", model="str", img_size="int", device="str", batch_size="int",
               workers="int", ema="flag", loader="str")
def evaluate(weights: str | Path, data: str | Path, *, model: str = "", img_size: int = 224, device: str = "auto",
             batch_size: int = 256, workers: int = 2, ema: bool = False, loader: str = "auto") -> dict[str, Any]:
    """Top-1 / top-5 per head on the val split of `data`: a run folder (its best checkpoint),
    a checkpoint, or weights from elsewhere with `model`."""
    from fastdeit.training.evaluate import Architecture, check_eval_args, evaluate_checkpoint
    from fastdeit.training.rundir import weights_of

    check_eval_args(device, batch_size, workers, loader)  # before any weights are fetched
    res = evaluate_checkpoint(weights_of(local_weights(str(weights), cache_dir())), Path(data), device, batch_size,
                              workers, ema, loader, cache_dir(), Architecture(model, img_size))
    return {"images": res.n, "unreadable": res.bad, "img_s": res.img_s,
            **{head: {"top1": res.top1(head), "top5": res.top5(head)} for head in res.heads}}


@_python_named(source="path", model="str", img_size="int", ema="flag")
def load(source: str | Path, *, model: str = "", img_size: int = 224, ema: bool = False) -> nn.Module:
    """The trained model as timm's nn.Module, in eval mode on the CPU: a run folder (its best
    checkpoint), a checkpoint, or weights from elsewhere with `model`. Its class names are in
    `model.fastdeit_classes`."""
    from fastdeit.training.evaluate import Architecture, load_for_inference
    from fastdeit.training.rundir import weights_of

    path = weights_of(local_weights(str(source), cache_dir()))
    loaded = load_for_inference(path, Architecture(model, img_size) if model else None, use_ema=ema)
    net = loaded.model.eval()
    net.fastdeit_classes = loaded.classes
    return net
