#!/bin/bash
# The device check of issue 11, one call: CUDA correctness checks, then the bf16 benchmark rows.
#   bash benchmarks/gpu_check.sh OUT_DIR
set -o pipefail
out=${1:?OUT_DIR}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 170 python3 benchmarks/gpu_check.py "$out" 2>&1 | tee "$out/checks.log"
timeout 220 python3 benchmarks/moe_layer.py --device cuda --dtype bfloat16 --kernels grouped_mm triton auto --tokens 4096 64 --reps 7 \
  --json "$out/bench_bf16.json" 2>&1 | tee "$out/bench.log"
