#!/usr/bin/env bash
# Speculative decoding on the GPU machine: the GPU tests (Triton rejection sampler, tiny Llama with graphs and
# n-gram drafts; plus the LoRA GPU tests), then the verify-step cost for k = 1..5 forced drafts at batch 1 on the
# Llama-3-8B shape (dummy weights) against a plain decode step.
# Run from the repository root there: `OUT=<dir> bash perf/gpu_spec_decode_check.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
OUT=${OUT:-/tmp/out}
M="--model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16"
[ -n "${SKIP_TESTS:-}" ] || timeout 240 python3 -m pytest -q -m gpu tests/gpu/test_gpu_spec_decode.py tests/gpu/test_gpu_lora.py \
  -p no:cacheprovider > "$OUT/spec_lora_gpu_tests.log" 2>&1
tail -n 2 "$OUT/spec_lora_gpu_tests.log"; grep -E "^(FAILED|ERROR)|Error" "$OUT/spec_lora_gpu_tests.log" | head -n 10
timeout 300 python3 -m perf.bench_spec_decode --verify-cost --k 1 2 3 4 5 --output-len 64 $M \
  --out "$OUT/spec_decode_verify_cost_llama8b.json" > "$OUT/spec_decode_verify_cost.log" 2>&1
grep '^{"k"' "$OUT/spec_decode_verify_cost.log" || tail -n 20 "$OUT/spec_decode_verify_cost.log"
# Where a verify step's time goes: a profile of one batch-1 run at k = 3 (PROFILE=1).
if [ -n "${PROFILE:-}" ]; then
  timeout 240 python3 -m perf.bench_spec_decode --verify-cost --k 3 --output-len 32 $M \
    --profile "$OUT/spec_decode_verify_profile_k3.txt" > "$OUT/spec_decode_profile.log" 2>&1
  grep '^{"k"' "$OUT/spec_decode_profile.log" || tail -n 20 "$OUT/spec_decode_profile.log"
fi
