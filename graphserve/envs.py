"""The only reader of os.environ: every GRAPHSERVE_* setting is declared (and documented) here.

Values are read lazily on attribute access (`graphserve.envs.GRAPHSERVE_CACHE_DIR`), so tests can
monkeypatch the environment after import.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def _cache_dir() -> str:
    # Root for downloaded models and other caches; expanded so callers get a usable path.
    return os.path.expanduser(os.environ.get("GRAPHSERVE_CACHE_DIR", os.path.join("~", ".cache", "graphserve")))


def _compile_cache_dir() -> str:
    # torch.compile artifacts (inductor's FX graph and AOTAutograd caches) persist here so a second start is fast.
    # An explicit TORCHINDUCTOR_CACHE_DIR from the user is honoured; ours is the default under the cache root.
    explicit = os.environ.get("GRAPHSERVE_COMPILE_CACHE_DIR") or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return os.path.expanduser(explicit) if explicit else os.path.join(_cache_dir(), "torch_compile")


environment_variables: dict[str, Callable[[], Any]] = {
    "GRAPHSERVE_CACHE_DIR": _cache_dir,
    "GRAPHSERVE_COMPILE_CACHE_DIR": _compile_cache_dir,
    # `graphserve serve`: the API key when --api-key is not given (unset or empty = no key).
    "GRAPHSERVE_API_KEY": lambda: os.environ.get("GRAPHSERVE_API_KEY") or None,
    # `graphserve serve`: seconds between the periodic stats log lines (0 = none).
    "GRAPHSERVE_LOG_STATS_INTERVAL": lambda: float(os.environ.get("GRAPHSERVE_LOG_STATS_INTERVAL", "10")),
}


def export_inductor_cache_dir(path: str) -> None:
    """Point inductor's on-disk cache at `path` for this process (and the compile workers it spawns).

    Inductor has no per-call cache-dir option: it reads TORCHINDUCTOR_CACHE_DIR whenever it resolves its cache
    directory, and its worker processes inherit the environment. So the engine sets it once at start-up, before
    its first compile, instead of mutating inductor's config at import.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path


def __getattr__(name: str) -> Any:
    """Evaluate a declared environment variable on access."""
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """List the declared environment variables."""
    return list(environment_variables)
