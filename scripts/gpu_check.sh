#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, CuPy, and a CUDA PyTorch
# already installed (no network needed), run the CUDA tests, the end-to-end
# parity check and the GPU benchmark, from the source tree.
#
#   scripts/gpu_check.sh OUTDIR
#
# Writes OUTDIR/{env.txt,tests.log,bench.log,bench.json}. Budget: under 8 minutes on an H100.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
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
timeout 300 python -m pytest -m cuda -v -rs -s tests/test_kernels.py tests/test_gpu_parity.py \
  -p no:cacheprovider 2>&1 | tee "$out/tests.log" || status=1
timeout 240 python benchmarks/bench_gpu_step.py --json "$out/bench.json" 2>&1 | tee "$out/bench.log" || status=1
exit $status
