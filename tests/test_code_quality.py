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


def test_only_the_platform_layer_names_a_vendor_api():
    """Events, streams, graphs, memory queries and device checks go through `graphserve.platforms`; the
    exceptions are the Triton kernels themselves, the GPU microbenchmarks and the version report."""
    allowed = ("graphserve/platforms/", "graphserve/ops/triton/", "graphserve/benchmarks/",
               "graphserve/entrypoints/env_info.py")
    offenders = []
    for directory, _, files in os.walk(os.path.join(ROOT, "graphserve")):
        for name in files:
            path = os.path.relpath(os.path.join(directory, name), ROOT)
            if not name.endswith(".py") or path.startswith(allowed):
                continue
            with open(os.path.join(ROOT, path)) as f:
                offenders += [f"{path}:{i}" for i, line in enumerate(f, 1) if "torch.cuda" in line]
    assert offenders == []
