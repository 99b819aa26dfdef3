"""The README's first command, run as a new user would: it serves the default model, and the curl it prints works."""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def readme_first_command() -> list[str]:
    """The serve part of the README's first command (after the install step), for this interpreter's venv."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        block = re.search(r"```bash\n(.*?)```", f.read(), re.S).group(1)
    command = block.strip().split("&&")[-1].strip()
    argv = shlex.split(command)
    assert argv[0].endswith("graphserve") and argv[1] == "serve", command
    argv[0] = os.path.join(os.path.dirname(sys.executable), "graphserve")  # .venv/bin/graphserve of this venv
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_first_command_serves_and_answers_paris(tmp_path):
    argv = readme_first_command() + ["--port", str(_free_port())]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        banner = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not any(line.startswith("  curl ") for line in banner):
            line = proc.stdout.readline()
            if not line:
                raise AssertionError("server exited:\n" + (tmp_path / "server.log").read_text()[-3000:])
            banner.append(line)
        curl = next(line for line in banner if line.startswith("  curl ")).strip()
        assert "capital of France" in curl
        if shutil.which("curl"):
            answer = json.loads(subprocess.run(["bash", "-c", curl + " -s"], capture_output=True, text=True,
                                               timeout=300, check=True).stdout)
        else:  # the same request without the curl binary
            url = re.search(r"curl (\S+)", curl).group(1)
            body = json.loads(re.search(r"-d '(.*)'", curl).group(1))
            answer = httpx.post(url, json=body, timeout=300).json()
        assert "Paris" in answer["choices"][0]["message"]["content"], answer
        assert answer["usage"]["completion_tokens"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
