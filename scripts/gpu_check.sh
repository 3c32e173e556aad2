#!/usr/bin/env bash
# The checks only a GPU can run, as one script for a lent device machine (its python3 has torch
# with CUDA): build, the op tests on CUDA against the reference, compute-sanitizer, the GPU
# benchmark. Results go to $OUT (the device tool's output folder) or bench/results.
#   bash scripts/gpu_check.sh            # everything, about 5-8 minutes on an H100
#   bash scripts/gpu_check.sh tests      # build + CUDA tests only
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
python3 -m pip install -q pytest numpy 2>/dev/null
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# 1. Exactness on CUDA: every op test has a cuda parametrisation when a GPU is visible.
python3 -m pytest -q -x python_tests/test_ops.py -k "cuda or mixed" 2>&1 | tee "$out/pytest-cuda.txt"
[ "${1:-all}" = tests ] && exit 0

# 2. compute-sanitizer on small calls of every path (projection fp32/bf16/fp16, logits form,
#    T > 1, several position groups, k = V).
cat > /tmp/sanitize_me.py <<'PY'
import torch, sled_ext
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    h = torch.randn(5, 3, 72, device="cuda", dtype=dtype)
    w = torch.randn(1001, 72, device="cuda", dtype=dtype) * 0.2
    b = torch.randn(1001, device="cuda", dtype=dtype)
    sled_ext.evolve(h, w, b, evolution_scale=10, iterations=3, softcap=30.0)
    sled_ext.evolve_topk(h, w, None, evolution_scale=1001)
sled_ext.evolve_logits(torch.randn(3, 70, 2500, device="cuda"), evolution_scale=100, iterations=2)
torch.cuda.synchronize()
print("sanitized calls done")
PY
for tool in memcheck racecheck synccheck initcheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 3 python3 /tmp/sanitize_me.py \
    > "$out/sanitizer-$tool.txt" 2>&1
  echo "compute-sanitizer $tool: exit $? (log: $out/sanitizer-$tool.txt)"
done

# 3. GPU benchmark: fused vs one final-row vocab-head matmul vs the reference.
python3 bench/bench_op.py --device cuda --json "$out/bench_op-cuda.json" 2>&1 | tail -20
