#!/usr/bin/env bash
# Multi-LoRA on the GPU machine: the LoRA GPU tests, then Llama-3-8B-shaped throughput and batch-1 latency with
# random rank-16 adapters on all seven projections against the base model in the same lease.
# Run from the repository root there: `OUT=<dir> bash perf/gpu_lora_check.sh`.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_INTERPRET=0
OUT=${OUT:-/tmp/out}
M="--model perf/configs/llama-3-8b --load-format dummy --dtype bfloat16"
TP="--num-prompts 256 --input-len 256 --output-len 256"
LORA="--enable-lora --max-loras 8 --max-lora-rank 16 --lora-rank 16"
timeout 150 python3 -m pytest -q -m gpu tests/gpu/test_gpu_lora.py -p no:cacheprovider > "$OUT/lora_gpu_tests.log" 2>&1
tail -n 2 "$OUT/lora_gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/lora_gpu_tests.log" | head -n 10
summary() { python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))['results']
for p in r.get('points', []): print(sys.argv[1].rsplit('/', 1)[-1], 'output tok/s', p['graphserve']['output_tokens_per_s'])
for d in r.get('decode', []): print(sys.argv[1].rsplit('/', 1)[-1], 'b', d['batch_size'], 'tok/s', d['decode_tokens_per_s'])
" "$1"; }
timeout 120 python3 -m graphserve bench throughput $M $TP --out "$OUT/lora_throughput_base.json" > /dev/null 2>&1
summary "$OUT/lora_throughput_base.json"
timeout 180 python3 -m graphserve bench throughput $M $TP $LORA --num-lora-adapters 8 \
  --out "$OUT/lora_throughput_8adapters.json" > "$OUT/lora_throughput_8adapters.log" 2>&1
summary "$OUT/lora_throughput_8adapters.json" || tail -n 5 "$OUT/lora_throughput_8adapters.log"
timeout 120 python3 -m graphserve bench latency $M $LORA --num-lora-adapters 1 --batch-sizes 1 --input-len 16 \
  --output-len 128 --ttft-lens --out "$OUT/lora_latency_b1.json" > "$OUT/lora_latency_b1.log" 2>&1
summary "$OUT/lora_latency_b1.json" || tail -n 5 "$OUT/lora_latency_b1.log"
timeout 90 python3 -m graphserve bench latency $M --batch-sizes 1 --input-len 16 --output-len 128 --ttft-lens \
  --out "$OUT/lora_latency_b1_base.json" > /dev/null 2>&1
summary "$OUT/lora_latency_b1_base.json"
