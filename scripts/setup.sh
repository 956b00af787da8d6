#!/usr/bin/env bash
# Create or update the virtual environment at .venv/ with the project and its test tools.
# Re-running is cheap: pip runs only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

# A working .venv (Python 3.10+, with pip) is kept, whatever PYTHON says: PYTHON picks the interpreter a new one is
# made with. A venv without pip is one whose creation failed half-way (Debian/Ubuntu without python3-venv).
if ! .venv/bin/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
    python=${PYTHON:-python3}
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "setup: Python 3.10 or newer is needed (found: $("$python" --version 2>&1)); set PYTHON=/path/to/python3" >&2
        exit 1
    fi
    rm -rf .venv
    if ! "$python" -m venv .venv; then
        rm -rf .venv
        echo "setup: could not create .venv (Debian/Ubuntu: sudo apt-get install python3-venv)" >&2
        exit 1
    fi
fi

stamp=.venv/.sd-torchserve-installed
# Hashed by Python: macOS before 15 has no sha256sum.
wanted=$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first and pinned, from the index scripts/torch_index.py picks: PyTorch's CPU one on Linux without an
    # NVIDIA GPU, else pip's own (PyPI's Linux build is the CUDA one). Its output is taken whole first, so that its
    # failure stops setup (`set -e` sees an assignment's, not a process substitution's), then read line by line:
    # macOS's bash 3.2 has no mapfile, and expands an empty array under `set -u` only as written below.
    arguments=$(.venv/bin/python -m scripts.torch_index)
    index=()
    while IFS= read -r argument; do
        if [ -n "$argument" ]; then index+=("$argument"); fi
    done <<< "$arguments"
    .venv/bin/python -m pip install -q ${index[@]+"${index[@]}"} "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[test]"
    echo "$wanted" > "$stamp"
fi
