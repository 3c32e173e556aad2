#!/usr/bin/env bash
# The checks only a GPU can run, as one script for a lent device machine (its python3 has torch
# with CUDA, and nothing outside it can be reached): build, the op tests on CUDA against the
# reference, compute-sanitizer, the GPU benchmarks. Results go to $OUT (the device tool's output
# folder) or bench/results. pytest comes from .device-wheels/ when the machine lacks it:
#   pip download -d .device-wheels --no-deps pytest pluggy iniconfig packaging
#   bash scripts/gpu_check.sh            # everything, about 8 minutes on an H200
#   bash scripts/gpu_check.sh tests      # build + CUDA tests only
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
stamp() { echo "[$(date +%T) +${SECONDS}s] $*"; }
python3 -c "import pytest" 2>/dev/null ||
  python3 -m pip install -q --no-index --find-links .device-wheels pytest
stamp build
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/build.txt" 2>&1 ||
  { tail -40 "$out/build.txt"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# 1. Exactness on CUDA: every op test has a cuda parametrisation when a GPU is visible.
stamp tests
timeout 240 python3 -m pytest -q -p no:cacheprovider python_tests/test_ops.py \
  python_tests/test_distributed.py -k "(cuda or mixed) and not rejects" 2>&1 |
  tee "$out/pytest-cuda.txt" | tail -30
tests_passed=$(( PIPESTATUS[0] == 0 ))
# Argument errors, apart: on the first GPU machine (AVX-512 host, torch 2.11) they segfaulted.
stamp "argument errors"
timeout 60 python3 -m pytest -q -p no:cacheprovider python_tests/test_ops.py \
  -k "bad or rejects" 2>&1 | tee "$out/pytest-errors.txt" | tail -3
[ "${1:-all}" = tests ] && exit 0

# 2. compute-sanitizer on small calls of every path (projection fp32/bf16/fp16, logits form,
#    T > 1, several position groups, k = V, both phases of the sharded form).
cat > /tmp/sanitize_me.py <<'PY'
import torch, sled_ext
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    h = torch.randn(5, 3, 72, device="cuda", dtype=dtype)
    w = torch.randn(1001, 72, device="cuda", dtype=dtype) * 0.2
    b = torch.randn(1001, device="cuda", dtype=dtype)
    sled_ext.evolve(h, w, b, evolution_scale=10, iterations=3, softcap=30.0)
    sled_ext.evolve_topk(h, w, None, evolution_scale=1001)
    parts = [sled_ext.partials(h, w[a:z], b[a:z], vocab_offset=a, evolution_scale=10, keep_final=True)
             for a, z in ((0, 4), (4, 600), (600, 1001))]
    sled_ext.combine(*[torch.stack([p[i] for p in parts]) for i in range(5)], evolution_scale=10)
sled_ext.evolve_logits(torch.randn(3, 70, 2500, device="cuda"), evolution_scale=100, iterations=2)
torch.cuda.synchronize()
print("sanitized calls done")
PY
# A failing test leaves time for a fix and a rerun: memcheck only, no benchmarks.
tools="memcheck racecheck synccheck initcheck"; [ "$tests_passed" = 1 ] || tools=memcheck
for tool in $tools; do
  stamp "compute-sanitizer $tool"
  timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 /tmp/sanitize_me.py \
    > "$out/sanitizer-$tool.txt" 2>&1
  echo "compute-sanitizer $tool: exit $? (log: $out/sanitizer-$tool.txt)"
done

[ "$tests_passed" = 1 ] || exit 1

# 3. GPU benchmarks: fused vs one final-row vocab-head matmul vs the reference; the two-phase
#    form split into 2 and 4 shards on the one GPU.
stamp bench_op
timeout 150 python3 bench/bench_op.py --device cuda --json "$out/bench_op-cuda.json" 2>&1 | tail -20
stamp bench_distributed
timeout 75 python3 bench/bench_distributed.py --device cuda --shards 1 2 4 \
  --json "$out/bench_distributed-cuda.json" 2>&1 | tail -20
stamp done
