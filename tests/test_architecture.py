"""docs/architecture.md stays true: every module is on the map, imports go one way down its
table, and one module owns the run folder's names and checkpoint reads."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("fastdeit", "pipelines", "kernels")


def _module_name(path: str) -> str:
    """A repository path -> the installed module (pipelines/ and kernels/ live under fastdeit)."""
    name = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    return name if name.startswith("fastdeit") else f"fastdeit.{name}"


def _map_rows() -> list[set[str]]:
    """The modules of each row of the layout table, in the page's order."""
    rows = []
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        if line.startswith("|"):
            cells = line.split("|")
            found = re.findall(r"`((?:fastdeit|pipelines|kernels)/[\w/]+\.py)`", cells[2] if len(cells) > 2 else "")
            if found:
                rows.append({_module_name(f) for f in found})
    return rows


def _package_modules() -> dict[str, Path]:
    files = [f for d in SOURCES for f in (ROOT / d).rglob("*.py") if f.name != "__init__.py"]
    return {_module_name(str(f.relative_to(ROOT))): f for f in files}


def _imports(path: Path) -> set[str]:
    """The fastdeit modules a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastdeit"):
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fastdeit")}
    return out


def test_every_module_is_on_the_map():
    mapped = set().union(*_map_rows())
    assert set(_package_modules()) == mapped


def test_every_benchmark_script_is_on_the_map():
    """The map's "outside" rows name every script of benchmarks/ (loop.py once went missing)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`benchmarks/(\w+\.(?:py|sh))`", text))
    scripts = {f.name for f in (ROOT / "benchmarks").iterdir() if f.suffix in (".py", ".sh")}
    assert scripts <= named, sorted(scripts - named)


def test_the_folders_are_the_maps():
    """The folder table of docs/architecture.md names every folder that holds a module, and
    every folder it names exists: `ls fastdeit/*/` and the map tell the same story."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("| folder | holds |"):text.index("Imports go one way")]
    named = set(re.findall(r"^\| `((?:fastdeit|pipelines|kernels)/[\w/]*)`", table, re.M))
    holding = set()
    for f in (f for d in SOURCES for f in (ROOT / d).rglob("*.py")):
        parts = f.relative_to(ROOT).parts
        deep = parts[0] == "fastdeit" and len(parts) > 2  # a package folder; pipelines/ and kernels/ are one each
        holding.add("/".join(parts[:2 if deep else 1]) + "/")
    assert named == holding


def test_only_the_entry_point_imports_the_command_line():
    """cli/ is the package's outside: the API, the trainer and the benchmarks never import it
    (nor typer through it); only `python -m fastdeit` reaches in."""
    outside = {name: path for name, path in _package_modules().items()
               if not name.startswith("fastdeit.cli.") and name != "fastdeit.__main__"}
    outside.update({f"benchmarks.{f.stem}": f for f in (ROOT / "benchmarks").glob("*.py")})
    wrong = [name for name, path in outside.items() if any(t.startswith("fastdeit.cli") for t in _imports(path))]
    assert not wrong


def test_the_python_api_loads_no_command_line():
    import subprocess
    import sys

    probe = ("import sys, fastdeit.api; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('typer', 'click') or m.startswith('fastdeit.cli')))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_imports_go_one_way_down_the_map():
    rows = _map_rows()
    row_of = {m: i for i, row in enumerate(rows) for m in row}
    wrong = []
    for name, path in _package_modules().items():
        for target in _imports(path) & set(row_of):
            if row_of[target] > row_of[name]:
                wrong.append(f"{name} imports {target}")
    assert not wrong


# The run folder's file names, as code spells them, and checkpoint reads.
_RUN_NAMES = re.compile(r"""["'](config\.json|metrics\.jsonl|checkpoint-(last|best)\.pt|summary\.json|"""
                        r"""teacher-labelmap)["']""")


def _code_without_docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_only_rundir_names_run_files_and_reads_checkpoints():
    files = [*_package_modules().values(), *(ROOT / "benchmarks").glob("*.py")]
    offenders = [str(f.relative_to(ROOT)) for f in files if f.name != "rundir.py"
                 and (_RUN_NAMES.search(code := _code_without_docstrings(f)) or "torch.load(" in code)]
    assert not offenders
    assert "torch.load(" in (ROOT / "fastdeit" / "training" / "rundir.py").read_text()
