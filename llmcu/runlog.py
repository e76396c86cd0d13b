"""main.jsonl: a machine-readable log per training run, one JSON object a line.

Train steps: {"step", "train_loss", "lr", "grad_norm", "ms", "tokens_per_s",
"mfu", "skipped"}; evaluations: {"step", "val_loss"}. "step" counts like
main.log's s: field (0-based: the train record of step s is the update made
from the parameters at step s). "mfu" is null: llmcu knows no peak FLOP/s for
the CPU, and for CUDA it is not measured yet. "skipped" is null or the reason
the update was skipped.
"""

from __future__ import annotations

import json
import math
import os

FILENAME = "main.jsonl"


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Appends records to DIR/main.jsonl (mode "w" truncates, "a" appends on resume)."""

    def __init__(self, output_dir: str, mode: str = "w"):
        self.path = os.path.join(output_dir, FILENAME)
        self._f = open(self.path, mode, encoding="utf-8")

    def write(self, **record) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def train_step(self, step: int, train_loss: float, lr: float, grad_norm: float, ms: float,
                   tokens_per_s: float, skipped: str | None = None, mfu: float | None = None):
        self.write(step=step, train_loss=float(train_loss), lr=float(lr),
                   grad_norm=float(grad_norm), ms=float(ms), tokens_per_s=float(tokens_per_s),
                   mfu=mfu, skipped=skipped)

    def val(self, step: int, val_loss: float) -> None:
        self.write(step=step, val_loss=float(val_loss))

    def close(self) -> None:
        self._f.close()


def read_runlog(run_dir) -> list[dict]:
    """The records of RUN_DIR/main.jsonl, in order; a clear error when it is missing."""
    path = os.path.join(str(run_dir), FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no {FILENAME} there; it is written by "
                                f"`llmcu train -o DIR` (DIR is the run directory)")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a non-null `key`, by step.

    A resumed run (-y 1) appends and may repeat steps past its checkpoint:
    the later record of a step wins."""
    by_step = {}
    for r in records:
        if r.get(key) is not None:
            by_step[r["step"]] = r[key]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]
