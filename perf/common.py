"""Shared pieces of the benchmarks: the JSON record every run writes."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time


def git_sha() -> str:
    """The checkout's commit (with '-dirty' when there are uncommitted changes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """Versions and device facts recorded with every result."""
    import torch
    import transformers

    from graphserve.platforms import current_platform

    plat = current_platform()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": plat.name.value,
        "device": plat.device_name(),
        "num_cpus": os.cpu_count(),
    }


def write_record(name: str, results: dict, out: str | None) -> dict:
    """Print the record as JSON and write it to `out` (a file path) when given."""
    record = {"benchmark": name, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              **environment(), "results": results}
    text = json.dumps(record, indent=2)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return record
