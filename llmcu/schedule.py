"""Learning-rate schedules and the batch arithmetic of a training step.

The schedules follow llm.c's llmc/schedulers.h: `step` is 0-based and runs
over [0, max_steps); warmup is linear, base_lr * (step + 1) / warmup, for
step < warmup; after it

  cosine    decays from base_lr to base_lr * final_frac along half a cosine
  linear    decays from base_lr to base_lr * final_frac along a line
  constant  base_lr at every step: llm.c's constant ignores warmup and final_frac
  wsd       warmup, stable at base_lr, then in the last 20% of the steps
            (from decay_point = int(0.8 * max_steps)) a 1 - sqrt decay to
            base_lr * final_frac (arXiv:2405.18392)

With llm.c's default final_frac = 1.0 every schedule is constant after warmup.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def check_schedule(schedule: str) -> str:
    """The schedule name if known, else a ValueError listing the known ones."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; "
                         f"expected one of: {', '.join(SCHEDULES)}")
    return schedule


def learning_rate(schedule: str, step: int, max_steps: int, base_lr: float,
                  warmup: int = 0, final_frac: float = 1.0) -> float:
    """The learning rate of 0-based `step` out of max_steps (llm.c's get_learning_rate)."""
    check_schedule(schedule)
    if not 0 <= step < max_steps:
        raise ValueError(f"learning_rate: step must be in [0, max_steps={max_steps}), got {step}")
    if warmup < 0:
        raise ValueError(f"learning_rate: warmup must be >= 0, got {warmup}")
    if schedule == "constant":
        return base_lr
    if step < warmup:
        return base_lr * (step + 1) / warmup
    min_lr = base_lr * final_frac
    if schedule == "wsd":
        # llm.c: (int)(0.8f * n); 4n // 5 is the same integer without float rounding
        decay_point = (4 * max_steps) // 5
        if step < decay_point:
            return base_lr
        ratio = (step - decay_point) / (max_steps - decay_point)
        return min_lr + (1.0 - math.sqrt(ratio)) * (base_lr - min_lr)
    ratio = (step - warmup) / (max_steps - warmup)
    if schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 at the start of decay, -> 0 at the end
        return min_lr + coeff * (base_lr - min_lr)
    return base_lr - ratio * (base_lr - min_lr)  # linear


def grad_accum_steps(total_batch_size: int, B: int, T: int, num_processes: int = 1) -> int:
    """Micro-steps per optimizer step: total_batch_size / (B * T * num_processes).

    total_batch_size is in tokens; -1 means one micro-batch per process
    (B * T * num_processes, no accumulation), as llm.c's -d -1.
    """
    tokens_per_micro_step = B * T * num_processes
    if total_batch_size == -1:
        return 1
    if total_batch_size <= 0 or total_batch_size % tokens_per_micro_step != 0:
        what = f"B*T = {B}*{T}" if num_processes == 1 else f"B*T*processes = {B}*{T}*{num_processes}"
        raise ValueError(
            f"total batch size {total_batch_size} (-d) must be a positive multiple of "
            f"{what} = {tokens_per_micro_step}, or -1 for no gradient accumulation")
    return total_batch_size // tokens_per_micro_step
