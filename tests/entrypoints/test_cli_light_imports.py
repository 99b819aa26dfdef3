"""`graphserve bench ...` / `generate` must run where the server's packages are absent (the GPU machine has no
fastapi or uvicorn): building the CLI parser imports none of them."""
import subprocess
import sys


def test_building_the_cli_parser_imports_no_server_package():
    code = ("import sys; import graphserve.entrypoints.cli as cli; cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
