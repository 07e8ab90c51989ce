# fastdeit: `just demo` sets up and runs the demo, `just test` sets up and runs the tests.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Create .venv and install fastdeit with its dev tools at the versions CI proved (constraints.txt);
# again when pyproject.toml or constraints.txt change, or when this machine needs another DALI wheel.
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    dali=$({{just_executable()}} --quiet dali-wheel)
    extras=dev
    [ "$dali" = none ] || extras="dev,$dali"
    stamp="$extras $(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if [ "$(cat .venv/.fastdeit-installed 2>/dev/null)" != "$stamp" ]; then
        echo "setup: installing fastdeit[$extras] into .venv at the versions of constraints.txt" >&2
        .venv/bin/python -m pip install -q -c constraints.txt --upgrade pip
        # The two DALI wheels cannot live side by side: drop the one this machine does not get.
        for wheel in nvidia-dali-cuda120 nvidia-dali-cuda130; do
            if [ "$wheel" != "nvidia-dali-${dali}0" ] && .venv/bin/python -m pip show -q "$wheel" 2>/dev/null; then
                .venv/bin/python -m pip uninstall -q -y "$wheel"
            fi
        done
        .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
        echo "$stamp" > .venv/.fastdeit-installed
    fi

# The DALI extra `just setup` installs: the driver's CUDA major version (nvidia-smi's "CUDA Version"),
# cuda13 on a machine without a GPU (DALI then runs its CPU graphs, as the tests do), none for a
# driver older than CUDA 12. FASTDEIT_DALI=cuda12|cuda13|none overrides.
dali-wheel:
    #!/usr/bin/env bash
    set -euo pipefail
    case "${FASTDEIT_DALI:-}" in
        cuda12|cuda13|none) echo "$FASTDEIT_DALI"; exit 0 ;;
        "") ;;
        *) echo "FASTDEIT_DALI=$FASTDEIT_DALI: use cuda12, cuda13 or none" >&2; exit 2 ;;
    esac
    if ! command -v nvidia-smi >/dev/null 2>&1; then echo cuda13; exit 0; fi
    major=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1)
    if [ -z "$major" ]; then echo cuda13
    elif [ "$major" -ge 13 ]; then echo cuda13
    elif [ "$major" -eq 12 ]; then echo cuda12
    else echo none; fi

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

# Re-resolve today's newest releases in a fresh environment (.venv-lock), run ruff and the suite
# with them, and only if both pass write them to constraints.txt; prints what changed. Commit the
# file with the versions in the message.
lock:
    #!/usr/bin/env bash
    set -euo pipefail
    rm -rf .venv-lock
    python3 -m venv .venv-lock
    .venv-lock/bin/python -m pip install -q --upgrade pip
    .venv-lock/bin/python -m pip install -q -e ".[dev,cuda13]"
    .venv-lock/bin/ruff check .
    .venv-lock/bin/python -m pytest -q
    .venv-lock/bin/python .ci/constraints.py write .venv-lock/bin/python constraints.txt

# What today's newest releases would change in constraints.txt, resolved without installing
# (CI prints it after the suite; `just lock` takes the change once the suite passes with it).
drift: setup
    .venv/bin/python -m pip install -q --dry-run --ignore-installed --report .venv/drift.json -e ".[dev,cuda13]"
    .venv/bin/python .ci/constraints.py drift .venv/drift.json constraints.txt
