"""The one table of the options of `train`, `cache-teacher` and `eval`: each option declared
once (its flag, type, help and the config key it sets), and each command's use of it (its
default, and its own words where the shared ones do not fit).

From this table come the commands' typer parameters (`fastdeit.cli.options`), the flag -> config key map
that a command's values are turned into (`Given.settings`), the flag an error shows in place of
a config key (`key_flags`; the faulty key's only where its flag was given), the
Python API's setting names, the flags that may stand alone, and the option table in docs/cli.md
(`python -m fastdeit.config.flags --write docs/cli.md`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastdeit.config.recipes import RECIPES
from fastdeit.config.schema import (
    AttnBackend,
    CacheMode,
    CompileMode,
    Device,
    DistillMode,
    Head,
    Loader,
    LogTo,
    TeacherTargets,
    TrainOnly,
    check_choice,
    choices,
)

REQUIRED = ...  # a Use default: the option must be given


@dataclass(frozen=True)
class Option:
    """A flag as every command that has it reads it. `help` may hold {choices}."""

    type: Any
    help: str
    key: str | None = None  # the config key it sets (train, cache-teacher, the Python API)
    flags: tuple[str, ...] = ()  # its names, when not --python-name
    choices: Any = None  # a Literal type: the allowed values, checked before anything runs
    alone: str | None = None  # the value of the flag given without one (`--resume` alone)


@dataclass(frozen=True)
class Use:
    """An option in one command: its default (None: the recipe's; REQUIRED) and its own help."""

    default: Any = None
    help: str | None = None


Op = Option
OPTIONS: dict[str, Option] = {
    # what to train, on what, where to
    "data": Op(Path, "ImageFolder root (train/, val/) or a prepared data set.", "data.path"),
    "model": Op(str, "deit_tiny/small/base[_distilled], deit3_small/medium/base/large/huge or any timm classifier.",
                "model.name"),
    "out": Op(Path, "Run folder (config.json, metrics.jsonl, checkpoints, summary.json).", "run.out"),
    "recipe_name": Op(str, " | ".join(RECIPES) + " (deit: the paper's ImageNet recipe; `fastdeit recipe NAME` "
                     "prints one).", flags=("--recipe",)),
    "config_file": Op(Path, "A TOML, YAML or JSON file of config sections (a run's config.json too), over the "
                      "recipe and under the flags and --set.", flags=("--config",)),
    # the plan (a cache is built for one plan: these must match its training runs)
    "epochs": Op(int, "Training epochs.", "sched.epochs"),
    "batch_size": Op(int, "Global batch size (split across ranks).", "run.batch_size"),
    "img_size": Op(int, "Training and eval resolution.", "data.img_size"),
    "seed": Op(int, "Seed of the augmentation plan and the initialisation.", "run.seed"),
    "lr": Op(float, "Learning rate at batch optim.base_batch (512; 768 in transfer); scaled by "
             "batch_size/base_batch.", "optim.lr"),
    # distillation
    "distill": Op(str, "{choices}.", "distill.mode", choices=DistillMode),
    "alpha": Op(float, "Weight of the distillation loss.", "distill.alpha"),
    "tau": Op(float, "Temperature of soft distillation.", "distill.tau"),
    "teacher": Op(str, "Teacher model name (timm).", "distill.teacher"),
    "teacher_ckpt": Op(str, "Teacher weights: a fastdeit checkpoint or run folder, a state_dict, a URL.",
                       "distill.teacher_ckpt"),
    "targets": Op(str, "{choices}: where the teacher's outputs come from.", "distill.targets",
                 choices=TeacherTargets),
    "teacher_cache": Op(Path, "Cache folder for --targets replay|labelmap.", "distill.teacher_cache"),
    "teacher_img_size": Op(int, "The resolution the teacher sees (default: the student's).",
                          "distill.teacher_img_size"),
    "topk": Op(int, "Logits (replay) or class scores per cell (labelmap) to keep.", "distill.topk"),
    "mode": Op(str, "{choices}: exact, per epoch | one pass per image.", choices=CacheMode),
    "verify_batches": Op(int, "Instead of building: re-run the teacher on N cached batches and report the "
                        "agreement.", flags=("--verify",)),
    # how it runs
    "device": Op(str, "{choices}.", "run.device", choices=Device),
    "loader": Op(str, "{choices} (auto: dali when CUDA and DALI are there).", "data.loader", choices=Loader),
    "resume": Op(str, "Resume from this checkpoint; `--resume` alone: OUT/checkpoint-last.pt if there is one, else "
                "start (so a requeued job needs no other flags).", alone="auto"),
    "attn": Op(str, "Attention backend: {choices}.", "model.attn", choices=AttnBackend),
    "compile_mode": Op(str, "torch.compile the student; `--compile` alone: mode `default` (measured best on an H200, "
                      "see docs/performance.md).", "run.compile", flags=("--compile",), choices=CompileMode,
                      alone="auto"),
    "ckpt_every": Op(int, "Steps between checkpoints besides every epoch's end (0: epoch ends only); a restarted or "
                    "resumed run continues from the last one.", "run.ckpt_every"),
    "train_only": Op(str, "{choices} (head: a linear probe; attn: the official --attn-only).", "model.train_only",
                    choices=TrainOnly),
    "log": Op(str, "{choices} (tensorboard: RUN/tensorboard/), besides metrics.jsonl.", "run.log", choices=LogTo),
    "accum_steps": Op(int, "Micro-batches per update on each rank: the same training in 1/K of the activation "
                     "memory.", "run.accum_steps"),
    # worker groups (torchrun)
    "gpus": Op(int, "GPUs per node: one worker each, started through torchrun (0: CPU workers, see --procs). "
              "Default: one process, no torchrun."),
    "procs": Op(int, "With --gpus 0: the number of CPU worker processes (gloo)."),
    "nodes": Op(int, "Machines in the run (torchrun --nnodes)."),
    "node_rank": Op(int, "This machine's number, 0..nodes-1."),
    "rdzv_endpoint": Op(str, "HOST:PORT of node 0 for the c10d rendezvous (multi-node)."),
    "max_restarts": Op(int, "Times torchrun restarts a failed worker group; it resumes from the last checkpoint."),
    # eval
    "ckpt": Op(str, "A fastdeit checkpoint or run folder (its best checkpoint), a saved transformers or timm "
              "folder (fastdeit export's), or weights from elsewhere (official DeiT .pth, timm, .safetensors; a "
              "path or an http(s) URL) with --model.",
              flags=("--ckpt", "--weights")),
    "patch_size": Op(int, "With --model: the model's patch size."),
    "head": Op(str, "{choices} (distilled models have all three).", choices=Head),
    "workers": Op(int, "Loader processes."),
    "ema": Op(bool, "Evaluate the EMA weights."),
    "overrides": Op(list[str], "section.key=value (repeatable).", flags=("--set",)),
}

U = Use
COMMANDS: dict[str, dict[str, Use]] = {
    "train": {
        "data": U(), "model": U(), "out": U(), "recipe_name": U("deit"), "config_file": U(), "epochs": U(),
        "batch_size": U(), "img_size": U(), "lr": U(), "distill": U(), "alpha": U(), "tau": U(), "teacher": U(),
        "teacher_ckpt": U(), "targets": U(), "teacher_cache": U(), "device": U(), "loader": U(), "seed": U(),
        "resume": U(), "attn": U(), "compile_mode": U(), "gpus": U(), "procs": U(1), "nodes": U(1),
        "node_rank": U(0), "rdzv_endpoint": U(), "ckpt_every": U(), "max_restarts": U(0), "teacher_img_size": U(),
        "train_only": U(), "log": U(), "accum_steps": U(), "overrides": U([]),
    },
    "cache-teacher": {
        "data": U(), "teacher": U(help="Teacher model name (timm); read from a fastdeit checkpoint if omitted."),
        "teacher_ckpt": U(help="Teacher weights (a path or an http(s) URL)."),
        "out": U(help="The cache folder (created; a killed build resumes in it)."), "mode": U("replay"),
        "epochs": U(help="replay: cover epochs 0..E-1 (default: the recipe's)."), "topk": U(),
        "teacher_img_size": U(help="replay: the resolution the teacher sees (the runs' setting)."),
        "recipe_name": U("deit", help="The plan's recipe: it must be the training runs'."),
        "batch_size": U(help="Global batch of the training runs (part of the plan)."),
        "img_size": U(help="Training resolution (part of the plan)."),
        "seed": U(help="The training runs' seed (part of the plan)."), "device": U(), "loader": U(),
        "verify_batches": U(0), "gpus": U(help="GPUs to build with: each builds every N-th shard (0: CPU workers)."),
        "procs": U(1), "overrides": U([], help="section.key=value (repeatable), as for train."),
    },
    "eval": {
        "data": U(REQUIRED, help="ImageFolder root or prepared data set; its val split is evaluated."),
        "ckpt": U(REQUIRED), "model": U(help="For weights that do not name their model: e.g. deit_small_distilled."),
        "img_size": U(224, help="With --model: the resolution to evaluate at."), "patch_size": U(16),
        "head": U("joint"), "device": U("auto"), "batch_size": U(256, help="Eval batch size."), "workers": U(2),
        "ema": U(False), "loader": U("auto"),
    },
}


def flags_of(name: str) -> tuple[str, ...]:
    """An option's flags: its declared names, else --its-python-name."""
    return OPTIONS[name].flags or ("--" + name.replace("_", "-"),)


def help_of(name: str, use: Use) -> str:
    opt = OPTIONS[name]
    text = use.help or opt.help
    return text.format(choices=" | ".join(choices(opt.choices))) if opt.choices else text


def key_flags(command: str, given: dict[str, Any] | None = None) -> dict[str, str]:
    """{config key: flag} of a command's options that set a config key; with `given` (the
    command's values), only those given a value: an error names its faulty key by the flag
    only where that flag was given (a value from the recipe or a --config file keeps its key)."""
    return {OPTIONS[n].key: flags_of(n)[0] for n in COMMANDS[command]
            if OPTIONS[n].key and (given is None or given.get(n) is not None)}


def alone_values() -> dict[str, str]:
    """{flag: value} of the flags that may stand alone."""
    return {flags_of(n)[0]: o.alone for n, o in OPTIONS.items() if o.alone}


class Given(SimpleNamespace):
    """One command's option values, by their Python names (`given.batch_size`)."""

    def settings(self) -> dict[str, Any]:
        """{config key: value} of the options that set one (None: not given)."""
        return {OPTIONS[n].key: v for n, v in vars(self).items() if OPTIONS[n].key}


def check_choices(values: dict[str, Any]) -> None:
    for name, value in values.items():
        opt = OPTIONS.get(name)
        if opt is not None and opt.choices is not None and value is not None:
            check_choice(flags_of(name)[0], value, opt.choices)


def _default_cell(command: str, name: str) -> str:
    use = COMMANDS[command].get(name)
    if use is None:
        return ""
    if use.default is REQUIRED:
        return "required"
    if use.default is None:  # a config key's value comes from the recipe (or --config) when not given
        return "recipe" if OPTIONS[name].key and command != "eval" else "—"
    if isinstance(use.default, bool):
        return "on" if use.default else "off"
    return "—" if use.default == [] else f"`{use.default}`"


def markdown() -> str:
    """The option table of docs/cli.md: one row per option; each command's cell is its default
    (recipe: the recipe's; required; blank: the command has no such flag)."""
    names = list(COMMANDS)
    lines = ["| flag | config key | " + " | ".join(f"`{c}`" for c in names) + " | what |",
             "|---" * (len(names) + 3) + "|"]
    for name in OPTIONS:
        cells = [_default_cell(command, name) for command in names]
        uses = {c: COMMANDS[c][name] for c in names if name in COMMANDS[c]}
        what = [help_of(name, Use())] * any(u.help is None for u in uses.values())
        what += [f"*{c}*: {help_of(name, u)}" for c, u in uses.items() if u.help is not None]
        what = " ".join(what).replace("|", "\\|")
        key = f"`{OPTIONS[name].key}`" if OPTIONS[name].key else ""
        lines.append(f"| {', '.join(f'`{f}`' for f in flags_of(name))} | {key} | " + " | ".join(cells) + f" | {what} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- options table: python -m fastdeit.config.flags --write docs/cli.md -->", "<!-- end of options -->"


def write(page: Path) -> bool:
    """Put the table between the page's markers; True if the page changed."""
    text = page.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{markdown()}{END}{tail}"
    page.write_text(new)
    return new != text


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        print("changed" if write(Path(sys.argv[2])) else "unchanged")
    else:
        print(markdown(), end="")
