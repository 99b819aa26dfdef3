#!/usr/bin/env bash
# Sets up .venv for graphserve on a fresh CPU machine (Python 3.11, PyPI only).
# torch==2.13.0 goes first, alone: any other order makes pip resolve a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
