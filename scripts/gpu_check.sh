#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, CuPy, and a CUDA PyTorch
# already installed (no network needed), run the CUDA tests and the GPU
# benchmarks from the source tree.
#
#   scripts/gpu_check.sh OUTDIR [quick|tests|bench|bench2|all] [QUICK_JSON]     (default: all)
#
# The device lease allows 10 minutes per command and 15 in all, so the
# stages are sized to run as separate commands: "quick" (the first command of a lease:
# the smoke run, the cuda tests of the code added since the last lease, the attention
# benchmark, and the step's prepared variants against the defaults and PyTorch in one
# run), "tests" (every cuda-marked test), "bench" (the step: breakdown, and llmcu
# against PyTorch at B=16 and B=64) and "bench2" (d24, attention, kernels, layers), each
# stage's timeouts summing to at most 8 minutes: a command that reaches the lease's limit
# may come back with none of its files (2026-11-28: a 590 s command whose timeouts summed
# to 570 s lost every log).
#
# Output: OUTDIR/STAGE.log (the machine, the commit, and every step's output, each step
# between "=== NAME" and "=== NAME: exit RC after S s" lines) and the benchmarks' *.json
# files, at most 7 files a stage: the device tool brings back at most 8 files from its
# $OUT. GPU_CHECK_COMMIT=<hash> names the commit when the tree's .git may be stale (a
# copied tree).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [quick|tests|bench|bench2|all] [QUICK_JSON]}
stage=${2:-all}
quick_json=${3:-}  # bench: a quick stage's bench_step_variants.json, whose fastest variant it times
case "$stage" in quick|tests|bench|bench2|all) ;; *) echo "unknown stage '$stage': expected quick, tests, bench, bench2 or all" >&2; exit 2;; esac
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/$stage.log"
: > "$log"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The device image's python3 is a venv's (/opt/torch/.venv) holding CuPy and PyTorch; a bare
# `python` may be absent there, and a symlink to the venv's python3 from elsewhere loses
# the venv (2026-11-28: "No module named numpy"). PYTHON overrides.
PY=${PYTHON:-python3}
status=0

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
  [ "$rc" = 0 ] || status=1
}

{
  echo "gpu_check.sh $stage"
  date -u
  # --dirty: a copied tree whose .git is stale or behind says so instead of naming a wrong commit
  echo "commit: ${GPU_CHECK_COMMIT:-$(git describe --always --dirty 2>/dev/null || echo "unknown (no git)")}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
} 2>&1 | tee -a "$log"

per_test=()
# (no "-p pytest_timeout": the image loads it already, and naming it again is an error)
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 90 --timeout_method thread)

if [ "$stage" = quick ]; then
  # 60 + 110 + 40 + 50 + 210 = 470 s of timeouts: run it with the device tool's timeout_s ~500
  step smoke 60 "$PY" scripts/gpu_smoke.py --device cuda
  # the cuda tests of what is new since the last lease: attention versions 5 to 9, cuBLASLt
  # autotuning and its BGRADB epilogue, the residual + layernorm fusions, the classifier's
  # version 3, the graphs
  step tests_new 110 "$PY" -m pytest -m cuda -v -rs -s -p no:cacheprovider "${per_test[@]}" \
    tests/test_flash_attention_v3.py tests/test_cublaslt_tune.py tests/test_layernorm_fused.py \
    tests/test_bias_epilogue.py tests/test_graphs.py tests/test_cublaslt.py
  step tests_new2 40 "$PY" -m pytest -m cuda -v -rs -s -p no:cacheprovider "${per_test[@]}" \
    tests/test_kernels.py tests/test_kernels_bf16.py tests/test_adamw_multi_tensor.py \
    -k "classifier or global_norm"
  step bench_attention 50 "$PY" benchmarks/bench_attention.py --json "$out/bench_attention.json"
  # the prepared variants, each against the defaults, as CUDA graphs (the MFU figure's
  # setting), and PyTorch eager and torch.compile, all in one process (attention versions 5
  # and 6 are timed against 7 and 8 by bench_attention.py above, not here: 12 llmcu rows)
  step bench_step_variants 210 "$PY" benchmarks/bench_gpu_step.py --dtype bf16 -b 16 --compile --no-kernels --steps 20 \
    --variants "graph=0;graph=1;flash=7,graph=1;flash=8,graph=1;flash=9,graph=1;\
gemm=cublaslt_tuned,graph=1;gemm=cublaslt_all_tuned,graph=1;gemm=cublaslt_all_tuned,bgrad=1,graph=1;\
classifier=3,graph=1;lnfuse=0,graph=1;\
flash=7,gemm=cublaslt_all_tuned,bgrad=1,classifier=3,graph=1;flash=8,gemm=cublaslt_all_tuned,bgrad=1,classifier=3,graph=1" \
    --json "$out/bench_step_variants.json"
fi

if [ "$stage" = tests ] || [ "$stage" = all ]; then
  # Fail fast if CuPy cannot compile and launch one kernel file, fp32 and bf16.
  step smoke 90 "$PY" scripts/gpu_smoke.py --device cuda
  # tests/test_distributed.py: the NCCL path at world size 1 (-z 0 and -z 1) against the
  # same run without a communicator; multi-GPU is not measured here.
  # A test that hangs (a kernel that never returns) is stopped after 90 s by pytest-timeout
  # where the image has it (it does: KINDS.md), so the others still run and report. The
  # newest kernels' tests come first.
  step tests 360 "$PY" -m pytest -m cuda -v -rs -s -p no:cacheprovider "${per_test[@]}" \
    tests/test_graphs.py tests/test_cublaslt.py tests/test_cublaslt_tune.py tests/test_adamw_multi_tensor.py \
    tests/test_flash_attention_v3.py tests/test_layernorm_fused.py tests/test_bias_epilogue.py \
    tests/test_reductions_v2.py \
    tests/test_kernels.py tests/test_kernels_bf16.py tests/test_layernorm_versions.py \
    tests/test_flash_attention.py tests/test_llama_kernels.py tests/test_llama_kernels_model.py \
    tests/test_gpu_parity.py tests/test_distributed.py tests/test_bf16_training.py \
    tests/test_llama_bf16.py tests/test_step_breakdown.py
fi

if [ "$stage" = bench ] || [ "$stage" = all ]; then
  # With a quick stage's JSON (third argument), the fastest of its graph rows is timed here
  # beside the defaults (scripts/best_variant.py), and the breakdown runs its settings; with
  # the quick stage's bench_attention.json beside it, in the attention block order that
  # benchmark timed faster for that variant's attention version.
  variant="" bd_flags=() att=()
  if [ -n "$quick_json" ]; then
    [ -f "$(dirname "$quick_json")/bench_attention.json" ] && att=(--attention "$(dirname "$quick_json")/bench_attention.json")
    variant=$("$PY" scripts/best_variant.py "$quick_json" --graph 1 "${att[@]}") || variant=""
    flags=$("$PY" scripts/best_variant.py "$quick_json" --graph 1 "${att[@]}" --breakdown-flags) && read -r -a bd_flags <<< "$flags"
    echo "bench: the quick stage's fastest variant: ${variant:-none}" | tee -a "$log"
  fi
  # first, so it runs even if a later entry times out: where one bf16 d12 step (B=16, T=1024)
  # goes, op by op, beside the copy and GEMM ceilings of this run (about 30 s once the
  # kernels are compiled: 2 + 10 + 3 steps; the compile it does is cached for the entries below)
  step bench_step_breakdown 100 "$PY" benchmarks/bench_step_breakdown.py --dtype bf16 -b 16 -t 1024 "${bd_flags[@]}" \
    --json "$out/bench_step_breakdown.json"
  # the headline: bf16 d12 at T=1024 against PyTorch autocast, eager and torch.compile, in the
  # same run: llmcu's defaults eager and as CUDA graphs, and the quick stage's fastest variant
  # eager and as graphs (without one: the fused attention's versions 3 and 4 and two GEMM routes)
  if [ -n "$variant" ]; then
    headline=(--variants "graph=0;graph=1;${variant/graph=1/graph=0};$variant")
  else
    headline=(--flash-versions 3,4 --gemm cublaslt,cublaslt_all --cuda-graph)
  fi
  step bench_step_bf16 170 "$PY" benchmarks/bench_gpu_step.py --dtype bf16 -b 16 --compile "${headline[@]}" --steps 20 \
    --json "$out/bench_step_bf16.json"
  # the issue's "largest micro-batch that fits": B=64 (llmcu needs about 4 x 9 GiB; PyTorch
  # eager about 4 x 30 GiB, within an H200's 141 GB), llmcu (the defaults, and the fastest
  # variant) as graphs against both PyTorch rows
  b64=(--cuda-graph)
  [ -n "$variant" ] && b64=(--variants "graph=1;$variant")
  step bench_step_bf16_b64 170 "$PY" benchmarks/bench_gpu_step.py --dtype bf16 -b 64 --compile "${b64[@]}" --steps 10 \
    --no-kernels --json "$out/bench_step_bf16_b64.json"
fi

if [ "$stage" = bench2 ] || [ "$stage" = all ]; then
  # d24 (350M) at one batch size, against PyTorch eager and torch.compile (pass 3 ran it
  # without torch.compile; its wall time was not recorded); the fp32 d12 step was measured on
  # 2026-11-28: benchmarks/gpu_runs/2026-11-28-h200/step_fp32.log
  step bench_step_d24 150 "$PY" benchmarks/bench_gpu_step.py --model d24 --dtype bf16 -b 8 --compile --no-kernels \
    --steps 10 --json "$out/bench_step_d24.json"
  step bench_attention 50 "$PY" benchmarks/bench_attention.py --json "$out/bench_attention.json"
  # 54 cases took 5.3 s on an H200 (benchmarks/gpu_runs/2026-11-28-h200/bench_kernels.log)
  step bench_kernels 50 "$PY" -m pytest -s -q -p no:cacheprovider benchmarks/bench_kernels.py \
    --benchmark-json "$out/bench_kernels.json"
  step bench_layers 30 "$PY" -m pytest -s -q -p no:cacheprovider benchmarks/bench_llama_layers.py \
    benchmarks/bench_layernorm.py
fi
echo "gpu_check.sh $stage: exit $status" | tee -a "$log"
exit $status
