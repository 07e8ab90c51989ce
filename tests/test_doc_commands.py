"""Every command the README and docs/ print runs, as printed, at toy size, through the real entry
points: each fenced `bash` or `python` block of README.md and docs/*.md, in page order, in one
working folder per page (a later block may use what an earlier one made, as a reader would).

What changes between the page and the run is all in SUBSTITUTIONS (the block's text) and SHIMS
(stand-ins on PATH), below; nothing else. A block that cannot run here is marked in the Markdown,
on the line before its fence, with `<!-- docs-test: not run: REASON -->`: it is listed as a
skipped test with that reason, and NOT_RUN below names every such block, so a new one is a
decision, not an accident.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch

from fastdeit.data.synthetic import write_synthetic

from tiny import TINY_SET

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|python)\s*$")
MARK = re.compile(r"^<!-- docs-test: not run: (.+?) -->\s*$")

# (pattern, replacement, why): regular expressions applied in this order to every block's text.
# {data}, {port} are filled per page: the toy data set's folder, a free TCP port.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (r"\s\[(?:--|[A-Z]+ )[^\]]*\]", "", "optional arguments shown in [brackets]: left out"),
    (r"/data/imagenet\b|\bDIR\b|\bFLOWERS\b", "{data}", "any ImageFolder tree: the toy one (3 classes, 32 px)"),
    (r"\bdemo-data\b", "{data}", "the data `fastdeit make-data demo-data` writes: the toy one"),
    (r"/shared/", "shared/", "the shared file system: a folder of the page's working folder"),
    (r"\bRUN\b", "runs/run", "a run folder"),
    (r"fastdeit train \.\.\.", "fastdeit train --data {data} --model deit_tiny_distilled --out runs/run",
     "`fastdeit train ...`: the toy run's data, model and folder (later flags still win)"),
    (r"fastdeit cache-teacher \.\.\.",
     "fastdeit cache-teacher --data {data} --teacher regnety_160 --teacher-ckpt regnety_160.pth --mode replay",
     "`fastdeit cache-teacher ...`: the cache of the block's first command"),
    (r"--data \.\.\. --out \.\.\.", "--data {data} --out runs/torchrun", "`--data ... --out ...`: the toy data, a run"),
    (r"--verify 20\b", "--verify 2", "a toy epoch has 2 batches, not 20"),
    (r"\bregnety_160\b", "resnet10t", "the teacher: a resnet10t (its weights, regnety_160.pth, as resnet10t.pth)"),
    (r"https://dl\.fbaipublicfiles\.com/deit/", "", "official weights: a toy file of the same name, not fetched"),
    (r"--gpus 8", "--gpus 0 --procs 2", "8 GPUs: 2 CPU workers (gloo)"),
    (r"--nproc-per-node 8", "--nproc-per-node 2", "8 ranks started by hand: 2"),
    (r"\bnode0:29500\b", "127.0.0.1:{port}", "node 0's address: this machine, a free port"),
    (r":29500\b", ":{port}", "the rendezvous port: a free one"),
    (r"(.*--node-rank 0 .*)", r"\1 & node0=$!", "two machines: node 0 in the background ..."),
    (r"(.*--node-rank 1 .*)", r"\1\nwait $node0", "... while node 1 runs; both must succeed"),
    (r"benchmarks/e2e\.py", "benchmarks/e2e.py --tiny", "the end-to-end benchmark at its toy size"),
    (r"benchmarks/ablation\.py(?= |$)", "benchmarks/ablation.py --tiny --arms none,hard",
     "the ablation study at its toy size, two arms"),
    (r"ablation_report\.py FILE", "ablation_report.py ablation-out/ablation.json", "the study's results file"),
]

# Every `fastdeit train` and `fastdeit cache-teacher` (SHIMS' fastdeit, torchrun) gets these last:
# `--set` wins over the recipe, a --config file and the flags, so the command keeps its meaning at
# toy size (a batch of 32: whole mix groups of 8 on each of 4 ranks). --compile runs uncompiled:
# compiling is slow on a CPU, and tests/test_speed_paths.py compiles the student.
TOY_SETS = ["data.img_size=32", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=8",
            "sched.epochs=1", "sched.warmup_epochs=0", "run.batch_size=32", "data.workers=0", "aug.mix_group=8",
            "data.eval_batch_size=32", "run.progress=false", "run.compile=none"]

# Stand-ins on PATH, first: name -> (bash body, why). $REAL_BIN: the environment's own commands.
SHIMS: dict[str, tuple[str, str]] = {
    "fastdeit": ('case "$1" in train|cache-teacher) exec "$REAL_BIN/fastdeit" "$@" $TOY ;; esac\n'
                 'exec "$REAL_BIN/fastdeit" "$@"',
                 "the real command; train and cache-teacher with TOY_SETS added"),
    "torchrun": ('if [[ " $* " == *" -m fastdeit train "* ]]; then exec "$REAL_BIN/torchrun" "$@" $TOY; fi\n'
                 'exec "$REAL_BIN/torchrun" "$@"',
                 "the real torchrun; fastdeit's train with TOY_SETS added"),
    "python": ('exec "$REAL_BIN/python" "$@"', "the environment's Python"),
    "srun": ('pids=()\n'
             'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done\n'
             'code=0\n'
             'for p in "${pids[@]}"; do wait "$p" || { c=$?; [ "$c" -gt "$code" ] && code=$c; }; done\n'
             'exit "$code"',
             "SLURM's srun: the command once per node ($SLURM_NNODES, all on this machine), SLURM_NODEID "
             "set, the highest exit code"),
    "scontrol": ('case "$1 ${2:-}" in\n'
                 '  "show hostnames") for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done ;;\n'
                 '  requeue*) echo "$*" >> scontrol.log ;;\n'
                 '  *) echo "scontrol stand-in: $*: not known" >&2; exit 1 ;;\n'
                 'esac',
                 "SLURM's scontrol: every node is 127.0.0.1; a requeue is written to scontrol.log"),
}
# What a SLURM job sees: two nodes.
SLURM_ENV = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_ID": "1"}

# Every block marked not to run, as "page: its first line".
NOT_RUN = {"README.md: pip install -e .              # CPU, or a GPU without DALI (the torch loader)",
           "README.md: pip install rust-just      # only if `just` is missing",
           "docs/cli.md: fastdeit train ... --out RUN --log wandb               # also a Weights & Biases run (pip "
           "install wandb)"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, from 1
    lang: str
    text: str
    not_run: str | None  # the reason, where the page marks the block

    @property
    def name(self) -> str:
        """Where it is (the test's id)."""
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def key(self) -> str:
        """What it is, wherever it moves on its page."""
        return f"{self.page.relative_to(ROOT)}: {self.text.splitlines()[0]}"


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = MARK.match(lines[i - 1]) if i else None
        out.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n", mark and mark.group(1)))
        i = end + 1
    return out


BLOCKS = [b for page in PAGES for b in blocks_of(page)]


def substituted(text: str, data: Path, port: int) -> str:
    for pattern, replacement, _why in SUBSTITUTIONS:
        text = re.sub(pattern, replacement, text, flags=re.MULTILINE)
    return text.replace("{data}", str(data)).replace("{port}", str(port))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_shims(folder: Path) -> None:
    folder.mkdir()
    for name, (body, why) in SHIMS.items():
        (folder / name).write_text(f"#!/usr/bin/env bash\n# {why}\n{body}\n")
        (folder / name).chmod(0o755)


def _write_weights(folder: Path) -> None:
    """The weights files the pages name, at toy size: the teacher, and official student weights."""
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), folder / "resnet10t.pth")
    toy = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "img_size": 32}
    for file, model in (("deit_base_distilled_patch16_224-df68dfff.pth", "deit_base_distilled_patch16_224"),
                        ("deit_small_patch16_224.pth", "deit_small_patch16_224")):
        torch.save({"model": timm.create_model(model, **toy).state_dict()}, folder / file)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Path]:
    """One working folder per page: the toy data, the weights, the benchmarks, the stand-ins."""
    shims = tmp_path_factory.mktemp("shims") / "bin"
    _write_shims(shims)
    out = {}
    for page in PAGES:
        work = tmp_path_factory.mktemp(page.stem)
        write_synthetic(work / "data", TINY_SET)
        _write_weights(work)
        (work / "benchmarks").symlink_to(ROOT / "benchmarks")
        out[page] = work
    out[shims] = shims
    return out


def _env(shims: Path) -> dict[str, str]:
    real_bin = str(Path(sys.executable).parent)
    return {**os.environ, **SLURM_ENV, "PATH": f"{shims}:{real_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "REAL_BIN": real_bin, "TOY": " ".join(f"--set {s}" for s in TOY_SETS), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_the_documented_command_runs(block: Block, workdirs: dict[Path, Path]) -> None:
    if block.not_run:
        pytest.skip(f"marked in the page: {block.not_run}")
    work = workdirs[block.page]
    shims = next(k for k in workdirs if k.name == "bin")
    text = substituted(block.text, work / "data", free_port())
    if block.lang == "python":
        command = [str(shims / "python"), "-c", text]
    elif text.startswith("#!"):  # a script: run as it is written, its own exit code
        command = ["bash", "-c", text]
    else:
        command = ["bash", "-c", "set -eo pipefail\n" + text]
    res = subprocess.run(command, cwd=work, env=_env(shims), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{block.name} as run:\n{text}\n--- stdout\n{res.stdout[-3000:]}\n" \
                                f"--- stderr\n{res.stderr[-5000:]}"


def test_the_blocks_not_run_are_the_listed_ones() -> None:
    assert {b.key for b in BLOCKS if b.not_run} == NOT_RUN


def test_the_substitutions_do_what_they_say(tmp_path) -> None:
    text = ("fastdeit train ... --out /shared/runs/s16 --gpus 8 --nodes 2 --node-rank 0 --rdzv-endpoint node0:29500\n"
            "fastdeit report RUN [RUN ...] [--out report.html]\n[ $code -eq 4 ] && echo x\n")
    got = substituted(text, tmp_path, 1234).splitlines()
    assert got[0] == (f"fastdeit train --data {tmp_path} --model deit_tiny_distilled --out runs/run --out "
                      f"shared/runs/s16 --gpus 0 --procs 2 --nodes 2 --node-rank 0 --rdzv-endpoint "
                      f"127.0.0.1:1234 & node0=$!")
    assert got[1:] == ["fastdeit report runs/run", "[ $code -eq 4 ] && echo x"]


def test_every_shim_is_a_stand_in_for_a_command_the_pages_use() -> None:
    used = " ".join(b.text for b in BLOCKS if not b.not_run)
    assert all(re.search(rf"(^|[\s\"(]){name}\b", used, re.MULTILINE) for name in SHIMS), \
        [name for name in SHIMS if not re.search(rf"(^|[\s\"(]){name}\b", used, re.MULTILINE)]
    assert shutil.which("bash")
