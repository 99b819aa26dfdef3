"""graphserve.core must stay importable without torch: the engine core may run in a process with no GPU stack."""
import subprocess
import sys


def test_core_imports_no_torch():
    code = (
        "import sys\n"
        "import graphserve.core.scheduler, graphserve.core.kv_cache_manager, graphserve.core.block_pool\n"
        "import graphserve.core.request, graphserve.core.scheduler_output, graphserve.core.kv_cache_utils\n"
        "assert 'torch' not in sys.modules, 'graphserve.core pulled in torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
