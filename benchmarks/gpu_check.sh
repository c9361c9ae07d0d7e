#!/usr/bin/env bash
# The GPU checks of issue 13 as one short script (a few minutes on one GPU), for a session that is lent one:
#   1. the CUDA tests that are skipped without a GPU (the op's Triton kernels; a user-compiled model on CUDA);
#   2. the op on CUDA against F.gelu and a copy: forward and forward + backward, fp32 and bf16, 16M and 64M
#      elements, with each variant's share of a copy's bandwidth (target: the compiled path >= 80%).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default runs/gpu; needs the project installed: make setup)
set -euo pipefail
out="${1:-runs/gpu}"
python=".venv/bin/python"
[ -x "$python" ] || python="python"
"$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU: nothing to check")'
mkdir -p "$out"
"$python" -m pytest -q -rs tests/test_fast_path.py -k cuda 2>&1 | tee "$out/cuda_tests.txt"
"$python" benchmarks/op_speed.py --device cuda --sizes 16777216,67108864 --dtypes fp32,bf16 \
    --rounds 3 --repeats 20 --out "$out/op_speed_cuda.json" --force
