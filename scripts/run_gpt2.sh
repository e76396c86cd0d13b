#!/usr/bin/env bash
# The GPT-2 pretraining recipe shared by scripts/run_gpt2_124M.sh and run_gpt2_350M.sh
# (llm.c's scripts/run_gpt2_124M.sh, for llmcu): data parallel bf16 with ZeRO-1 and the
# gradient reduction overlapped with the backward, checkpoints, and a retry loop that
# resumes from the newest complete checkpoint until the last one is written.
#
# Settings (environment; the two wrappers set the model's):
#   MODEL        d12 | d24 | ...                 TRAIN, VAL    token shard globs
#   OUT          output dir (every node sees it) HELLASWAG     llm.c eval file ("" or missing: off)
#   BATCH        per-process B (the most; lowered so B*T*world divides TOTAL, the rest is
#                gradient accumulation)           SEQ           T
#   TOTAL        tokens per optimizer step (-d)  STEPS         optimizer steps (-x)
#   LR, WARMUP, WD, EVERY (val and HellaSwag), CKPT (checkpoint every), NPROC (GPUs per
#   node with torchrun), MAX_TRIES (launches before giving up; a crash resumes from the
#   newest checkpoint)
#   SMOKE=1      the same recipe on CPUs end to end in seconds: d6 on the NumPy model,
#                fp32, gloo, 2 processes, B=1 T=32, 2 steps, everything every step
#   DRY_RUN=1    print the launch command and stop
# Launch: inside an sbatch allocation (SLURM_JOB_ID set, not SMOKE) srun starts one task
# per GPU (sbatch --nodes=1 or --nodes=2 scripts/run_gpt2_124M.sh); otherwise
# torchrun --standalone --nproc_per_node NPROC on this node.
set -euo pipefail

if [ "${SMOKE:-0}" = 1 ]; then
    MODEL=d6 BATCH=1 SEQ=32 TOTAL=64 STEPS=2 LR=${LR:-6e-4} WARMUP=1 EVERY=1 CKPT=1 NPROC=2
    DEVICE=cpu DTYPE=fp32 VAL_BATCHES=1 GEN=8 SAMPLE=2
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    DEVICE=cuda DTYPE=bf16 VAL_BATCHES=20 GEN=144 SAMPLE=20000
fi
MODEL=${MODEL:?set MODEL (scripts/run_gpt2_124M.sh does)}
TRAIN=${TRAIN:-"data/fineweb10B/fineweb_train_*.bin"}
VAL=${VAL:-"data/fineweb10B/fineweb_val_*.bin"}
OUT=${OUT:-log_gpt2_${MODEL}}
HELLASWAG=${HELLASWAG-data/hellaswag/hellaswag_val.bin}
BATCH=${BATCH:-64} SEQ=${SEQ:-1024} TOTAL=${TOTAL:-524288} STEPS=${STEPS:-19560}
LR=${LR:-6e-4} WARMUP=${WARMUP:-700} WD=${WD:-0.1} EVERY=${EVERY:-250} CKPT=${CKPT:-5000}
NPROC=${NPROC:-8} MAX_TRIES=${MAX_TRIES:-20} PYTHON=${PYTHON:-python}

if [ -n "${SLURM_JOB_ID:-}" ] && [ "${SMOKE:-0}" != 1 ]; then
    world=${SLURM_NTASKS:?inside sbatch: SLURM_NTASKS (--ntasks-per-node 8 per node)}
    # sed reads all of scontrol's output (head -n 1 would close the pipe early: SIGPIPE, and
    # with pipefail the script would exit 141 when scontrol is still writing)
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
    export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
    launch=(srun "$PYTHON" -m llmcu train)
else
    world=$NPROC
    launch=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m llmcu train)
fi

# the largest B <= BATCH with B*T*world dividing TOTAL: two nodes of 8 at -d 524288 run B=32
B=$BATCH
while [ "$B" -gt 1 ] && [ $((TOTAL % (B * SEQ * world))) -ne 0 ]; do B=$((B - 1)); done
if [ $((TOTAL % (B * SEQ * world))) -ne 0 ]; then
    echo "run_gpt2.sh: TOTAL=$TOTAL is not a multiple of T*world = $((SEQ * world))" >&2
    exit 2
fi

args=(-e "$MODEL" -i "$TRAIN" -j "$VAL" -o "$OUT" --device "$DEVICE" --dtype "$DTYPE"
      -b "$B" -t "$SEQ" -d "$TOTAL" -x "$STEPS" -l "$LR" -u "$WARMUP" -k cosine -q 0.0
      -c "$WD" -z 1 -v "$EVERY" -m "$VAL_BATCHES" -n "$CKPT" -s "$SAMPLE" -g "$GEN")
if [ -n "$HELLASWAG" ] && [ -f "$HELLASWAG" ]; then
    args+=(--hellaswag "$HELLASWAG")
else
    echo "run_gpt2.sh: no HellaSwag file at '${HELLASWAG}' (llmcu prepare hellaswag): evaluating val loss only"
fi

last=$(printf "%s/DONE_%08d" "$OUT" "$STEPS")
tries=0
while [ ! -f "$last" ]; do
    resume=()
    if ls "$OUT"/DONE_* >/dev/null 2>&1; then resume=(-y 1); fi  # a crash: go on from the newest
    if [ "${DRY_RUN:-0}" = 1 ]; then
        echo "${launch[*]} ${args[*]} ${resume[*]}"
        exit 0
    fi
    tries=$((tries + 1))
    if [ "$tries" -gt "$MAX_TRIES" ]; then
        echo "run_gpt2.sh: $MAX_TRIES launches and no $last; giving up" >&2
        exit 1
    fi
    "${launch[@]}" "${args[@]}" "${resume[@]}" || echo "run_gpt2.sh: launch $tries failed (exit $?)" >&2
    [ -f "$last" ] || sleep 1
done
echo "run_gpt2.sh: done, $last"
