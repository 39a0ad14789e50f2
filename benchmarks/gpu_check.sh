#!/bin/bash
# The one GPU script (issues 11 and 27): one call, under 8 minutes on an H100, every part bounded by `timeout`.
#   bash benchmarks/gpu_check.sh OUT_DIR
# 1. CUDA correctness checks of the MoE kernels (gpu_check.py --small);
# 2. MoE layers at real shapes, bf16 fwd+bwd: moec grouped_mm / Triton / compiled, HF grouped_mm, torchtitan-style,
#    the dense limit and its fp8 twin (gpu_layers.py);
# 3. a 1.9B-parameter MoE's training step: moec compiled vs HF Mixtral on the same weights, and moec fp8 (gpu_model.py).
# JSON in OUT_DIR, copied to benchmarks/results/<gpu>_*.json. Without a CUDA device the same scripts run on the CPU
# at tiny shapes (the smoke mode CI runs), and nothing is copied.
set -o pipefail
out=${1:?OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
if "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  "$py" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
  timeout 60 "$py" "$here/gpu_check.py" "$out" --small 2>&1 | tee "$out/checks.log"
  timeout 200 "$py" "$here/gpu_layers.py" --json "$out/layers_bf16.json" 2>&1 | tee "$out/layers.log"
  timeout 190 "$py" "$here/gpu_model.py" --json "$out/model_step.json" 2>&1 | tee "$out/model.log"
  gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
  for name in checks layers_bf16 model_step; do
    [ -f "$out/$name.json" ] && cp "$out/$name.json" "$here/results/${gpu}_$name.json"
  done
else
  echo "no CUDA device: the CPU smoke mode at tiny shapes" | tee "$out/gpu.txt"
  timeout 100 "$py" "$here/gpu_layers.py" --smoke --reps 1 --json "$out/layers_bf16.json" 2>&1 | tee "$out/layers.log" || exit 1
  timeout 100 "$py" "$here/gpu_model.py" --smoke --steps 1 --json "$out/model_step.json" 2>&1 | tee "$out/model.log" || exit 1
fi
