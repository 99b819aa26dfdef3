"""The JSON record every benchmark run writes: command, git sha, versions, device, numbers, roofline fractions."""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_sha() -> str:
    """The checkout's commit ('-dirty' with uncommitted changes), or 'unknown' outside a git checkout."""
    if not os.path.exists(os.path.join(_REPO_ROOT, "pyproject.toml")):
        return "unknown"  # an installed copy of the package: whatever repository encloses it is not its source
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO_ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=_REPO_ROOT,
                               stderr=subprocess.DEVNULL).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """Versions and device facts recorded with every result."""
    import torch
    import transformers

    import graphserve
    from graphserve.platforms import current_platform

    plat = current_platform()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "git_sha": git_sha(),
        "graphserve": graphserve.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": plat.name.value,
        "device": plat.device_name(),
        "num_cpus": os.cpu_count(),
    }


def command_line(cli_argv: Sequence[str] | None = None) -> str:
    """The command that produced a record: `graphserve ARGS` for the CLI, else the interpreter and sys.argv."""
    if cli_argv is not None:
        return shlex.join(["graphserve", *cli_argv])
    return shlex.join([os.path.basename(sys.executable), *sys.argv])


def write_record(name: str, results: dict, out: str | None, cli_argv: Sequence[str] | None = None) -> dict:
    """Print the record as JSON and write it to `out` (a file path) when given; returns the record."""
    record = {"benchmark": name, "command": command_line(cli_argv), **environment(), "results": results}
    text = json.dumps(record, indent=2)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return record
