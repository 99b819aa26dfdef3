#!/usr/bin/env bash
# Speculative decoding on the GPU machine. Run from the repository root there: `OUT=<dir> bash perf/gpu_spec_decode_check.sh [part]`.
#   tests:     the GPU tests of speculative decoding (Triton rejection sampler; tiny Llama with compile, decode and
#              verify graphs and n-gram drafts) and of LoRA (ops; tiny Llama with adapters in every compile/graph/
#              async mode); and FP8 W8A8 (cuBLASLt scaled GEMM at Llama-3-8B shapes, tiny Llama with graphs);
#   cost:      verify-step cost for k = 1..5 forced drafts at batch 1 on the Llama-3-8B shape (dummy weights), one
#              engine per k, against a plain decode step (PROFILE=1 adds a profile of the k = 5 run); then the
#              same with a 1-layer draft model of the same shape proposing (k = 1, 3, 5);
#   synthetic: n-gram on copy-heavy token-id prompts at batch 1, 8, 32 and 64, plain vs k = 3 and 5, no policy.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0 GRAPHSERVE_COMPILE_CACHE_DIR=/tmp/gs_compile
OUT=${OUT:-/tmp/out}
PART=${1:-tests cost}
M="--model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16"
case " $PART " in *" tests "*)
  timeout 330 python3 -m pytest -q -m gpu tests/gpu/test_gpu_spec_decode.py tests/gpu/test_gpu_lora.py tests/gpu/test_gpu_fp8.py \
    -p no:cacheprovider > "$OUT/spec_lora_gpu_tests.log" 2>&1
  tail -n 2 "$OUT/spec_lora_gpu_tests.log"; grep -E "^(FAILED|ERROR)|^E .*row" "$OUT/spec_lora_gpu_tests.log" | head -n 20;;
esac
case " $PART " in *" cost "*)
  PROF=""; [ -n "${PROFILE:-}" ] && PROF="--profile $OUT/spec_decode_verify_profile.txt"
  timeout 420 python3 -m perf.bench_spec_decode --verify-cost --k 1 2 3 4 5 --output-len 64 $M \
    --cuda-graph-sizes 1 2 4 8 $PROF --out "$OUT/spec_decode_verify_cost_llama8b.json" > "$OUT/spec_decode_verify_cost.log" 2>&1
  grep '^{"k"' "$OUT/spec_decode_verify_cost.log" || tail -n 20 "$OUT/spec_decode_verify_cost.log"
  timeout 300 python3 -m perf.bench_spec_decode --verify-cost --k 1 3 5 --output-len 64 $M \
    --draft-model perf/configs/llama-3-8b-1layer --cuda-graph-sizes 1 2 4 8 \
    --out "$OUT/spec_decode_draft_cost_llama8b.json" > "$OUT/spec_decode_draft_cost.log" 2>&1
  grep '^{"k"' "$OUT/spec_decode_draft_cost.log" || tail -n 20 "$OUT/spec_decode_draft_cost.log";;
esac
case " $PART " in *" synthetic "*)
  timeout 540 python3 -m perf.bench_spec_decode --synthetic --batch-sizes 1 8 32 64 --k 3 5 --max-tokens 128 $M \
    --cuda-graph-sizes 1 2 4 8 16 32 64 --max-num-seqs 64 --out "$OUT/spec_decode_synthetic_llama8b.json" \
    > "$OUT/spec_decode_synthetic.log" 2>&1
  grep '^{"batch_size"' "$OUT/spec_decode_synthetic.log" || tail -n 20 "$OUT/spec_decode_synthetic.log";;
esac
