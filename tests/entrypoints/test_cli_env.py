"""`graphserve env`: versions, platform, devices and the kernel choice per op."""
import json

import pytest

from graphserve.entrypoints.cli import main


def _run(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_env_text_lists_kernel_choices(capsys):
    out = _run(capsys, ["env"])
    lines = out.splitlines()
    assert any(line.startswith("torch ") for line in lines)
    assert any(line.split() == ["platform", "cpu"] for line in lines)
    assert any(line.split()[:3] == ["paged_attention", "torch", "not"] for line in lines)
    assert any(line.split()[:3] == ["rms_norm", "torch", "graph-safe"] for line in lines)


def test_env_json(capsys):
    info = json.loads(_run(capsys, ["env", "--json"]))
    assert set(info) == {"versions", "platform", "devices", "kernels"}
    assert info["platform"]["platform"] == "cpu" and info["versions"]["transformers"]
    assert info["kernels"]["reshape_and_cache"] == {"impl": "torch", "graph_safe": False}
    assert info["devices"][0]["total_memory"] > 0
