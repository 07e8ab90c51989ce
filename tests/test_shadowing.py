"""The root folders kernels/ and pipelines/ never shadow an installed distribution of the same
name: Python started in the repository root (as the suite, `python -m` and notebooks are) imports
the installed `kernels` and `pipelines`, and fastdeit's own under fastdeit.kernels/.pipelines."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stand_in(site: Path, name: str) -> None:
    """A distribution named `name` with a submodule, as pip would leave it."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(f"from .part import WHO\nORIGIN = 'stand-in {name}'\n")
    (site / name / "part.py").write_text(f"WHO = 'part of the stand-in {name}'\n")
    (site / f"{name}-9.9.dist-info").mkdir()
    (site / f"{name}-9.9.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9\n")


def _python(code: str, *flags: str, env_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **({"PYTHONPATH": str(env_path)} if env_path else {})}
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_installed_distributions_win_over_the_root_folders(tmp_path):
    for name in ("kernels", "pipelines"):
        _stand_in(tmp_path, name)
    code = ("import importlib.metadata, kernels, pipelines\n"
            "from kernels import WHO\n"
            "import fastdeit.kernels, fastdeit.pipelines.batch\n"
            "print(kernels.ORIGIN, '|', WHO, '|', pipelines.ORIGIN, '|', importlib.metadata.version('kernels'))\n"
            "print(fastdeit.kernels.__file__, fastdeit.pipelines.batch.LoadedBatch.__name__)\n")
    out = _python(code, env_path=tmp_path)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "stand-in kernels | part of the stand-in kernels | stand-in pipelines | 9.9"
    assert second.endswith("LoadedBatch") and "kernels" in second


def test_without_an_installed_distribution_the_bare_names_are_missing():
    """-S: no site-packages (where the test environment may hold PyPI's kernels); the repository
    root, the working directory, is still on the path."""
    code = ("import importlib.util\n"
            "for name in ('kernels', 'pipelines'):\n"
            "    try:\n"
            "        __import__(name)\n"
            "    except ModuleNotFoundError as e:\n"
            "        print(name, 'missing:', e.name)\n"
            "    else:\n"
            "        print(name, 'imported')\n"
            "import fastdeit.runtime.shadowing\n")
    out = _python(code, "-S")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["kernels missing: kernels", "pipelines missing: pipelines"]
