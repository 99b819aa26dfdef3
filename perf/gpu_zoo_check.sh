#!/usr/bin/env bash
# The model zoo and MoE on the GPU, graphs and compile: every architecture added to tests/gpu/test_gpu_tiny_models.py
# after Llama / Mistral / Qwen2 / Qwen3, in the compile + graphs mode (MODE=all: also eager and TORCH_SDPA), and the
# fused MoE kernel tests. Run from the repository root there: `OUT=<dir> bash perf/gpu_zoo_check.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0 GRAPHSERVE_COMPILE_CACHE_DIR=/tmp/gs_compile
OUT=${OUT:-/tmp/out}
ARCHS="mixtral or moe or granite or phi3 or starcoder2 or olmo2 or gemma or neox or falcon"
FILTER="($ARCHS)"
[ "${MODE:-}" = all ] || FILTER="compile_graphs and $FILTER"
timeout "${LIMIT:-400}" python3 -m pytest -q -m gpu tests/gpu/test_gpu_moe.py tests/gpu/test_gpu_tiny_models.py \
  -k "$FILTER or fused_moe" -p no:cacheprovider > "$OUT/zoo_moe_gpu_tests.log" 2>&1
tail -n 2 "$OUT/zoo_moe_gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/zoo_moe_gpu_tests.log" | head -n 20
