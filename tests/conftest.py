"""Suite-wide fixtures: tiny random checkpoints with a real (trained-on-the-fly) byte-level BPE tokenizer."""
import os

# Must be set before any @triton.jit decorator runs (CPU machines have no GPU; kernels run in the interpreter).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from perf.tiny_checkpoint import build_tokenizer, write_tiny_checkpoint  # noqa: E402,F401


class TinyModels:
    """Builds each tiny checkpoint (weights + tokenizer) once per session: name -> (dir, HF model)."""

    def __init__(self, tmp_path_factory):
        self._factory = tmp_path_factory
        self._cache = {}

    def __call__(self, arch: str):
        if arch not in self._cache:
            path = str(self._factory.mktemp(f"tiny-{arch}"))
            self._cache[arch] = (path, write_tiny_checkpoint(path, arch))
        return self._cache[arch]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model("llama") -> (checkpoint dir with tokenizer, the transformers model in fp32)."""
    return TinyModels(tmp_path_factory)


_exit_status = 0


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config):
    """Leave without interpreter teardown once pytest has reported.

    Triton's nanobind bindings print dozens of "leaked function" lines at interpreter exit, burying pytest's
    summary; every report is written by now, so skip the teardown and keep pytest's exit status.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
