"""Guarded imports of the vendor management libraries (pynvml from nvidia-ml-py, amdsmi).

Both are optional at run time: on a machine without the vendor's driver `import amdsmi` raises KeyError and
prints to stdout, and pynvml imports but `nvmlInit()` raises. A missing library must never break graphserve
or write to the user's stdout (which may be a JSON stream), so every failure is caught and only logged.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
from types import ModuleType

logger = logging.getLogger(__name__)


def import_quietly(name: str) -> ModuleType | None:
    """Import module `name` with stdout/stderr captured; None (logged at debug level) if the import fails at all."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            module = importlib.import_module(name)
    except BaseException as e:  # noqa: BLE001  (amdsmi raises KeyError; anything else means unusable too)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        logger.debug("import %s failed: %r; it printed %r", name, e, captured.getvalue()[:500])
        return None
    if captured.getvalue():
        logger.debug("import %s printed %r", name, captured.getvalue()[:500])
    return module


def call_quietly(fn, *args, **kwargs):
    """Call a vendor-library function with its output captured; returns (result, None) or (None, exception)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            return fn(*args, **kwargs), None
    except Exception as e:  # noqa: BLE001  (NVMLError_LibraryNotFound, AmdSmiLibraryException, ...)
        logger.debug("%s failed: %r; it printed %r", getattr(fn, "__name__", fn), e, captured.getvalue()[:500])
        return None, e
