#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, CuPy, and a CUDA PyTorch
# already installed (no network needed), run the CUDA tests and the GPU
# benchmarks from the source tree.
#
#   scripts/gpu_check.sh OUTDIR [smoke|tests|step|lab|all]     (default: all)
#
# Stages, each one command of the device tool (10 minutes a command, at most 8 files back
# from its $OUT, and a command that reaches its limit may come back with none of its files:
# 2026-11-28, a 590 s command whose timeouts summed to 570 s lost every log), so each
# stage's timeouts sum to at most 8 minutes:
#   smoke  scripts/gpu_smoke.py: one kernel file compiled and launched, then one small
#          launch of each product kernel the tests take long to reach
#   tests  every cuda-marked test (pytest -m cuda: tests/ and tests/lab/)
#   step   the product step (benchmarks/bench_gpu_step.py), eager and as CUDA graphs,
#          against PyTorch eager and torch.compile: bf16 d12 at B=16 and B=32, d24 at B=8
#   lab    benchmarks/lab.py on the GPU for the layers whose lab holds a candidate (a
#          version not yet measured against the product kernel), one JSON each
# "all" runs the four in order, each into its own log (more than 8 files: not for the
# device tool).
#
# Output: OUTDIR/STAGE.log (the machine, the commit, and every step's output, each step
# between "=== NAME" and "=== NAME: exit RC after S s" lines) and the benchmarks' *.json
# files. GPU_CHECK_COMMIT=<hash> names the commit when the tree's .git may be stale (a
# copied tree).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [smoke|tests|step|lab|all]}
stage=${2:-all}
case "$stage" in smoke|tests|step|lab|all) ;; *) echo "unknown stage '$stage': expected smoke, tests, step, lab or all" >&2; exit 2;; esac
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The device image's python3 is a venv's (/opt/torch/.venv) holding CuPy and PyTorch; a bare
# `python` may be absent there, and a symlink to the venv's python3 from elsewhere loses
# the venv (2026-11-28: "No module named numpy"). PYTHON overrides.
PY=${PYTHON:-python3}
status=0    # 1 once a step of any stage failed
failed=0    # 1 once a step of the current stage failed

# step NAME SECONDS COMMAND...: COMMAND under `timeout SECONDS`, its output to the screen
# and the stage's log between two marker lines; a failure (or a timeout: exit 124) is
# reported and remembered, and the next step runs.
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (timeout $limit s, $(date -u +%H:%M:%S) UTC)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ "$rc" = 0 ] || failed=1 status=1
}

per_test=()
# (no "-p pytest_timeout": the image loads it already, and naming it again is an error)
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 90 --timeout_method thread)

run_stage() {
  log="$out/$1.log" failed=0
  : > "$log"
  {
    echo "gpu_check.sh $1"
    date -u
    # --dirty: a copied tree whose .git is stale or behind says so instead of naming a wrong commit
    echo "commit: ${GPU_CHECK_COMMIT:-$(git describe --always --dirty 2>/dev/null || echo "unknown (no git)")}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PY" -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  } 2>&1 | tee -a "$log"
  case "$1" in
    smoke)
      step smoke 120 "$PY" scripts/gpu_smoke.py --device cuda ;;
    tests)
      # A test that hangs (a kernel that never returns) is stopped after 90 s by pytest-timeout
      # where the image has it (it does: KINDS.md), so the others still run and report.
      # tests/test_distributed.py runs the NCCL path at world size 1; multi-GPU is not measured.
      step tests 460 "$PY" -m pytest -m cuda -q -p no:cacheprovider "${per_test[@]}" ;;
    step)
      # the headline: bf16 d12 at T=1024; then a larger micro-batch (B=32: PyTorch eager needs
      # about 60 GiB, within an H100's 80) and d24 (350M). torch.compile compiles in each run.
      step step_d12 150 "$PY" benchmarks/bench_gpu_step.py --dtype bf16 -b 16 -t 1024 --cuda-graph --compile \
        --steps 20 --json "$out/step_d12.json"
      step step_d12_b32 150 "$PY" benchmarks/bench_gpu_step.py --dtype bf16 -b 32 -t 1024 --cuda-graph --compile \
        --steps 10 --json "$out/step_d12_b32.json"
      step step_d24 150 "$PY" benchmarks/bench_gpu_step.py --model d24 --dtype bf16 -b 8 -t 1024 --cuda-graph \
        --compile --steps 10 --json "$out/step_d24.json" ;;
    lab)
      # The layers whose lab (kernels/dev/LAYER.cu) holds a candidate, none measured on a GPU
      # yet: attention 4-9 (and 3-9 in the heavy-first block order), layernorm's 16-byte
      # forward 2, classifier 3, adamw 3, global_norm 2; each against its product kernel and
      # PyTorch, in bf16 (the step's dtype). The attention lab has the most to compile.
      lab() {
        local name=$1 limit=$2
        shift 2
        step "lab_$name" "$limit" "$PY" benchmarks/lab.py "$@" --device cuda --dtype bf16 --json "$out/lab_$name.json"
      }
      lab attention 150 attention
      lab attention_heavy_first 90 attention --schedule heavy_first
      lab layernorm 50 layernorm
      lab classifier 80 classifier
      lab adamw 50 adamw
      lab global_norm 50 global_norm ;;
  esac
  echo "gpu_check.sh $1: exit $failed" | tee -a "$log"
}

if [ "$stage" = all ]; then
  for s in smoke tests step lab; do run_stage "$s"; done
else
  run_stage "$stage"
fi
exit $status
