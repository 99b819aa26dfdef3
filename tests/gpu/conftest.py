"""The device check: real-shape tests for the GPU machine, run as one command, `python -m pytest -m gpu -q`.

Every test in this folder gets the `gpu` marker and is skipped where torch sees no CUDA GPU. tests/conftest.py
defaults TRITON_INTERPRET to 1 for the CPU machines. When a run selects only these tests (`-m gpu`, or paths
inside tests/gpu) on a GPU, this file turns the interpreter off before any Triton kernel module is imported, so
the kernels are compiled for the device. A run that also selects the CPU suite keeps the interpreter, which
those Triton tests need, and skips the GPU tests with the reason.

GRAPHSERVE_GPU_TESTS_DEVICE=cpu dry-runs the engine-level tests on the CPU (eager, smaller shapes where a test
says so), to check their logic without a GPU; the tests that need CUDA (kernels, graphs, the 8B shape) skip.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
DRY_RUN_ON_CPU = os.environ.get("GRAPHSERVE_GPU_TESTS_DEVICE", "").strip().lower() == "cpu"
_skip_reason: str | None = None


def _deselects_unmarked_tests(markexpr: str) -> bool:
    """Whether `-m markexpr` leaves out tests without markers (the CPU suite)."""
    if not markexpr.strip():
        return False
    try:
        from _pytest.mark.expression import Expression

        return not Expression.compile(markexpr).evaluate(lambda name, **kwargs: False)
    except (ImportError, AttributeError, TypeError):  # a private pytest API: fall back to the documented form
        return markexpr.strip() == "gpu"


def _selects_only_gpu_tests(config: pytest.Config) -> bool:
    """`-m gpu` (or any marker expression excluding unmarked tests), or every path argument inside tests/gpu."""
    if _deselects_unmarked_tests(config.getoption("markexpr", "") or ""):
        return True
    base = Path(config.invocation_params.dir)
    paths = [(base / str(arg).split("::")[0]).resolve() for arg in config.args]
    return bool(paths) and all(p == HERE or HERE in p.parents for p in paths)


def pytest_configure(config: pytest.Config) -> None:
    """Decide, before the test modules of this folder are imported, whether the GPU tests can run here."""
    global _skip_reason
    if DRY_RUN_ON_CPU:
        return
    if not torch.cuda.is_available():
        _skip_reason = "no CUDA GPU (torch.cuda.is_available() is False)"
        return
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    if not _selects_only_gpu_tests(config):
        _skip_reason = ("this run also selects the CPU suite, whose Triton tests need TRITON_INTERPRET=1: "
                        "run the device check on its own, `python -m pytest -m gpu`")
        return
    # @triton.jit picks interpreter or compiler when a kernel module is imported, so it must not have been yet.
    imported = sorted(m for m in sys.modules if m.startswith("graphserve.ops.triton."))
    if imported:
        _skip_reason = (f"{imported} were imported in Triton interpreter mode before tests/gpu/conftest.py "
                        "ran: run `TRITON_INTERPRET=0 python -m pytest -m gpu`")
        return
    os.environ["TRITON_INTERPRET"] = "0"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this folder `gpu`, and skip them all where they cannot run."""
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if _skip_reason is not None:
            item.add_marker(pytest.mark.skip(reason=_skip_reason))


@pytest.fixture(scope="session")
def device() -> str:
    """Where the engine-level tests run: "cuda", or "cpu" under GRAPHSERVE_GPU_TESTS_DEVICE=cpu."""
    return "cpu" if DRY_RUN_ON_CPU else "cuda"


@pytest.fixture(scope="session")
def needs_cuda(device: str) -> None:
    """Skip a test that means nothing without the GPU (kernels, graphs, an 8B model) in the CPU dry run."""
    if device != "cuda":
        pytest.skip("needs CUDA; the GRAPHSERVE_GPU_TESTS_DEVICE=cpu dry run covers the engine-level tests only")


@pytest.fixture(scope="session")
def cuda_kernels(needs_cuda: None) -> dict[str, str]:
    """The Triton kernels registered on the CUDA dispatch key, as the CUDA platform does at start-up."""
    from graphserve.ops.triton import register_triton_kernels

    registered = register_triton_kernels("CUDA")
    assert registered, "no Triton kernels registered (is triton installed?)"
    return registered
