#!/usr/bin/env bash
# GPT-2 350M (d24) on ~10B tokens: scripts/run_gpt2_124M.sh's recipe with the d24 model,
# lr 3e-4 (GPT-3's table pairs 350M with 3e-4, 125M with 6e-4) and B=16 per GPU with
# gradient accumulation to the same 524,288 tokens a step (4 micro-steps on 8 GPUs; the
# largest B that fits an 80 GB GPU is not measured here). STEPS=... for a longer run.
#
#   TRAIN=... VAL=... scripts/run_gpt2_350M.sh        # torchrun, one node of 8 GPUs
#   sbatch [--nodes=2] scripts/run_gpt2_350M.sh       # SLURM
#
# Every setting is an environment variable of scripts/run_gpt2.sh.
#SBATCH --job-name=gpt2_350M
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
set -euo pipefail
here=$(dirname "$0")
[ -f "$here/run_gpt2.sh" ] || here="${SLURM_SUBMIT_DIR:-.}/scripts"
export MODEL=${MODEL:-d24} LR=${LR:-3e-4} BATCH=${BATCH:-16} OUT=${OUT:-log_gpt2_350M}
exec bash "$here/run_gpt2.sh"
