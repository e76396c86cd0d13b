#!/usr/bin/env bash
# GPT-2 124M (d12) on ~10B tokens, as llm.c's scripts/run_gpt2_124M.sh: 8 GPUs, bf16,
# ZeRO-1, B=64 T=1024, 524,288 tokens a step (no accumulation on 8 GPUs), lr 6e-4 with
# 700 warmup steps and cosine decay to 0, weight decay 0.1, 19,560 steps, val loss and
# HellaSwag every 250 steps, a checkpoint every 5,000 (the loop resumes after a crash).
#
#   TRAIN="data/fineweb10B/fineweb_train_*.bin" VAL="data/fineweb10B/fineweb_val_*.bin" \
#       scripts/run_gpt2_124M.sh                      # torchrun, one node of 8 GPUs
#   sbatch scripts/run_gpt2_124M.sh                   # SLURM, one node
#   sbatch --nodes=2 scripts/run_gpt2_124M.sh         # two nodes: B=32, the same 524,288 tokens
#   SMOKE=1 TRAIN=... VAL=... scripts/run_gpt2_124M.sh  # CPUs, seconds (scripts/run_gpt2.sh)
#
# Every setting is an environment variable of scripts/run_gpt2.sh.
#SBATCH --job-name=gpt2_124M
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: find run_gpt2.sh from the
# directory sbatch was called in (the repository root) then
here=$(dirname "$0")
[ -f "$here/run_gpt2.sh" ] || here="${SLURM_SUBMIT_DIR:-.}/scripts"
export MODEL=${MODEL:-d12} LR=${LR:-6e-4} BATCH=${BATCH:-64} OUT=${OUT:-log_gpt2_124M}
exec bash "$here/run_gpt2.sh"
