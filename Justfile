# fastdeit: `just demo` sets up and runs the demo, `just test` sets up and runs the tests.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Create .venv and install fastdeit with its dev tools (again only when pyproject.toml changes).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if [ ! -f .venv/.fastdeit-installed ] || [ pyproject.toml -nt .venv/.fastdeit-installed ]; then
        .venv/bin/python -m pip install -q --upgrade pip
        .venv/bin/python -m pip install -q -e ".[dev]"
        touch .venv/.fastdeit-installed
    fi

# Generate the synthetic data, train a teacher and four DeiT-tiny students, print the table.
demo *ARGS: setup
    .venv/bin/fastdeit demo {{ARGS}}

# ruff, then the test suite (CPU; GPU-only tests are skipped without CUDA).
test *ARGS: setup
    .venv/bin/ruff check .
    .venv/bin/python -m pytest {{ARGS}}

# Format and fix what ruff can fix.
fmt: setup
    .venv/bin/ruff check --fix .
