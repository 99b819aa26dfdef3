"""Lint and layering over the repository: ruff and the import-linter contracts, both configured in pyproject.toml."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    """A console script of this environment (next to the interpreter), run from the repository root."""
    path = os.path.join(os.path.dirname(sys.executable), tool)
    if not os.path.exists(path):
        pytest.fail(f"{tool} is not installed in this environment: install graphserve with its [test] extras")
    return subprocess.run([path, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    result = _run("ruff", "check", "--no-cache", "graphserve", "tests", "perf")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_layering_contracts_hold():
    """core imports no torch; ops, platforms, attention, sampling and layers import nothing above them; the engine
    and the entrypoints reach the device only through the executor."""
    result = _run("lint-imports", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
