"""The only reader of os.environ: every GRAPHSERVE_* setting is declared (and documented) here.

Values are read lazily on attribute access (`graphserve.envs.GRAPHSERVE_CACHE_DIR`), so tests can
monkeypatch the environment after import.
"""
from __future__ import annotations

import os
from typing import Any, Callable


def _cache_dir() -> str:
    # Root for downloaded models and other caches; expanded so callers get a usable path.
    return os.path.expanduser(os.environ.get("GRAPHSERVE_CACHE_DIR", os.path.join("~", ".cache", "graphserve")))


environment_variables: dict[str, Callable[[], Any]] = {
    "GRAPHSERVE_CACHE_DIR": _cache_dir,
}


def __getattr__(name: str) -> Any:
    """Evaluate a declared environment variable on access."""
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """List the declared environment variables."""
    return list(environment_variables)
