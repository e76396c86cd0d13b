#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, CuPy, and a CUDA PyTorch
# already installed (no network needed), run the CUDA tests and the GPU
# benchmarks from the source tree.
#
#   scripts/gpu_check.sh OUTDIR [tests|bench|all]     (default: all)
#
# The device lease allows 10 minutes per command and 15 in all, so the two
# stages are sized to run as separate commands: "tests" (every cuda-marked
# test, under 7 minutes) and "bench" (every GPU benchmark, under 7 minutes).
# Writes OUTDIR/env.txt and, per stage, OUTDIR/tests.log or the bench_*.log
# and *.json files.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [tests|bench|all]}
stage=${2:-all}
case "$stage" in tests|bench|all) ;; *) echo "unknown stage '$stage': expected tests, bench or all" >&2; exit 2;; esac
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u; git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no git)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
} > "$out/env.txt"
cat "$out/env.txt"
status=0

if [ "$stage" != bench ]; then
  # Fail fast if CuPy cannot compile and launch one kernel file, fp32 and bf16.
  timeout 90 python scripts/gpu_smoke.py --device cuda 2>&1 | tee "$out/smoke.log" || status=1
  # tests/test_distributed.py: the NCCL path at world size 1 (-z 0 and -z 1) against the
  # same run without a communicator; multi-GPU is not measured here.
  timeout 420 python -m pytest -m cuda -v -rs -s -p no:cacheprovider \
    tests/test_kernels.py tests/test_kernels_bf16.py tests/test_layernorm_versions.py \
    tests/test_flash_attention.py tests/test_llama_kernels.py tests/test_llama_kernels_model.py \
    tests/test_gpu_parity.py tests/test_distributed.py tests/test_bf16_training.py \
    tests/test_llama_bf16.py \
    2>&1 | tee "$out/tests.log" || status=1
fi

if [ "$stage" != tests ]; then
  # the headline first: bf16 d12 at T=1024 against PyTorch autocast, eager and torch.compile
  timeout 200 python benchmarks/bench_gpu_step.py --dtype bf16 -b 16 --compile \
    --json "$out/bench_step_bf16.json" 2>&1 | tee "$out/bench_step_bf16.log" || status=1
  timeout 120 python benchmarks/bench_gpu_step.py --json "$out/bench_step.json" 2>&1 \
    | tee "$out/bench_step.log" || status=1
  timeout 90 python benchmarks/bench_attention.py --json "$out/bench_attention.json" 2>&1 \
    | tee "$out/bench_attention.log" || status=1
  timeout 90 python -m pytest -s -q -p no:cacheprovider benchmarks/bench_kernels.py \
    --benchmark-json "$out/bench_kernels.json" 2>&1 | tee "$out/bench_kernels.log" || status=1
  timeout 40 python -m pytest -s -q -p no:cacheprovider benchmarks/bench_llama_layers.py \
    benchmarks/bench_layernorm.py 2>&1 | tee "$out/bench_layers.log" || status=1
fi
exit $status
