"""Checkpoints of a training run, in llm.c's layout, and resuming from them.

A checkpoint at step S in the output dir is three files, written in this order:

    model_%08d.bin        the parameters, llm.c's model format (formats.write_model)
    state_%08d_%05d.bin   AdamW m and v, the step, the train loader's position,
                          the outlier windows and the sampling RNG (formats.write_train_state),
                          one per process and rank as llm.c writes them: with -z 1 each
                          holds its rank's shard of m and v (llmcu/distributed.py)
    DONE_%08d             an empty completion marker, written last (by rank 0, once
                          every rank has written its state)

Each file is written to a temporary name and renamed, so a run killed at any
moment leaves every earlier checkpoint intact; a checkpoint without its DONE
marker is ignored by resume, and removed by it (remove_incomplete); save()
removes what it wrote itself when it is stopped before DONE (a second Ctrl-C).
A checkpoint at step S holds the state at the top of the loop's step S after
that step's eval and sample, before its training step: a resumed run starts
with that training step, and cut_logs drops what the stopped run logged past
S, so main.log and main.jsonl read as if it had never stopped. Resume takes
the newest complete checkpoint that reads and matches, saying which newer ones
it skipped and why (load_latest). No checkpoint or model file is written with
non-finite parameters (check_finite).

Test hooks, half-way through writing the state file of the checkpoint at step S:
LLMCU_TEST_CRASH_IN_CHECKPOINT=S kills the process (SIGKILL);
LLMCU_TEST_SIGINT_IN_CHECKPOINT=S:N sends it N SIGINTs (a Ctrl-C, or two).
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal

import numpy as np

from . import formats
from .config import GPT2Config

CRASH_ENV = "LLMCU_TEST_CRASH_IN_CHECKPOINT"
SIGINT_ENV = "LLMCU_TEST_SIGINT_IN_CHECKPOINT"


def model_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"model_{step:08d}.bin")


def state_path(out_dir: str, step: int, rank: int = 0) -> str:
    return os.path.join(out_dir, f"state_{step:08d}_{rank:05d}.bin")


def done_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"DONE_{step:08d}")


def complete_steps(out_dir: str) -> list[int]:
    """Steps with a DONE marker in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    steps = [int(m.group(1)) for name in os.listdir(out_dir)
             if (m := re.fullmatch(r"DONE_(\d{8})", name))]
    return sorted(steps)


def _crash_hook(step: int):
    at, _, times = os.environ.get(SIGINT_ENV, "").partition(":")
    if at == str(step):
        def interrupt():
            for _ in range(int(times or 1)):
                os.kill(os.getpid(), signal.SIGINT)
        return interrupt
    if os.environ.get(CRASH_ENV) != str(step):
        return None

    def crash():
        if hasattr(signal, "SIGKILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)
    return crash


def save(out_dir: str, step: int, model, train_loader, rng, loss_detector, norm_detector,
         keep: int = 0, log=print, comm=None) -> None:
    """Write the checkpoint at `step` (model, state, then DONE); then, with keep > 0,
    delete the complete checkpoints older than the newest `keep`.

    comm (data parallel): every rank writes its own state file, rank 0 the model
    file, the DONE marker (after a barrier) and the deletions."""
    config = model.config
    rank, world = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    try:
        _save(out_dir, step, model, config, rank, world, train_loader, rng, loss_detector,
              norm_detector, comm)
    except BaseException:
        # stopped or failed before DONE: take back this step's files, so no orphan is left
        if not os.path.exists(done_path(out_dir, step)):
            for path in (model_path(out_dir, step) if rank == 0 else None,
                         state_path(out_dir, step, rank)):
                if path and os.path.exists(path):
                    os.remove(path)
        raise
    if rank != 0:
        return
    log(f"wrote checkpoint {model_path(out_dir, step)}, {state_path(out_dir, step)}"
        + (f" (and ranks 1..{world - 1})" if world > 1 else ""))
    if keep > 0:
        steps = complete_steps(out_dir)
        kept = set(steps[-keep:]) | {step}
        for old in steps:
            if old in kept:
                continue
            # the marker goes first: a crash in between leaves an incomplete, ignored checkpoint
            states = sorted(glob.glob(os.path.join(out_dir, f"state_{old:08d}_*.bin")))
            for path in (done_path(out_dir, old), *states, model_path(out_dir, old)):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass


def _save(out_dir, step, model, config, rank, world, train_loader, rng, loss_detector,
          norm_detector, comm) -> None:
    """save()'s writes: rank 0 the model, every rank its state, rank 0 DONE after a barrier."""
    m, v = model.optimizer_state()
    state = formats.TrainState(
        step=step, m=m, v=v, loader=train_loader.state(), B=train_loader.B, T=train_loader.T,
        window=loss_detector.window, loss_window=list(loss_detector.values),
        norm_window=list(norm_detector.values), rng_state=rng.bit_generator.state,
        num_processes=world, rank=rank, master=master_weights(model))
    if rank == 0:  # the parameters are the same on every rank
        params = model.params_host()
        check_finite(params, model_path(out_dir, step))
        formats.write_model(model_path(out_dir, step), config, params, dtype=model_file_dtype(model))
    formats.write_train_state(state_path(out_dir, step, rank), state, _midway=_crash_hook(step))
    if comm is not None:
        comm.barrier()  # every state file is in place before the marker
    if rank == 0:
        with formats.atomic_write(done_path(out_dir, step)):
            pass


def check_finite(params, path: str) -> None:
    """Refuse to write `path` from parameters holding NaN or inf (a guard behind the
    training loop's: a model file must always be one that can be trained on)."""
    bad = np.size(params) - int(np.count_nonzero(np.isfinite(params)))
    if bad:
        from .train import TrainingDiverged
        raise TrainingDiverged(f"not writing {path}: {bad} of {np.size(params)} parameters are "
                               f"NaN or inf")


def remove_incomplete(out_dir: str, log=print) -> None:
    """Delete the model and state files of checkpoints without a DONE marker (left by a
    process killed mid-checkpoint), saying so; complete checkpoints are not touched."""
    done = set(complete_steps(out_dir))
    orphans: dict[int, list[str]] = {}
    for name in sorted(os.listdir(out_dir)):
        m = re.fullmatch(r"(?:model_(\d{8})\.bin|state_(\d{8})_\d{5}\.bin)", name)
        if m and int(m.group(1) or m.group(2)) not in done:
            orphans.setdefault(int(m.group(1) or m.group(2)), []).append(name)
    for step, names in sorted(orphans.items()):
        for name in names:
            os.remove(os.path.join(out_dir, name))
        log(f"removed incomplete checkpoint {step} (no DONE marker): {', '.join(names)}")


def cut_logs(out_dir: str, step: int) -> None:
    """Keep in main.log and main.jsonl what a run resumed at the checkpoint of `step` does not
    redo: the training records of steps before it and the evals up to it (the checkpoint is
    written after its step's eval). Rewritten atomically; absent files are left absent."""
    def keep(s: int, train: bool) -> bool:
        return s < step if train else s <= step

    path = os.path.join(out_dir, "main.log")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [ln for ln in lines if not (m := re.match(r"s:(\d+) (\w+):", ln))
                or keep(int(m.group(1)), m.group(2) == "trl")]  # trl: a train line; tel, eval: evals
        with formats.atomic_write(path) as f:
            f.write("".join(kept).encode("utf-8"))
    path = os.path.join(out_dir, "main.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = []
        for ln in lines:
            try:
                r = json.loads(ln)
            except ValueError:
                continue  # a line cut short by a kill: dropped
            if isinstance(r, dict) and isinstance(r.get("step"), int) and \
                    not keep(r["step"], "train_loss" in r):
                continue
            kept.append(ln if ln.endswith("\n") else ln + "\n")
        with formats.atomic_write(path) as f:
            f.write("".join(kept).encode("utf-8"))


def model_file_dtype(model) -> str:
    """The model file's dtype: llm.c's version 5 (bfloat16) for a bf16 model, else 3."""
    return "bfloat16" if getattr(model, "dtype", "fp32") == "bf16" else "float32"


def master_weights(model):
    """A bf16 model's fp32 master weights as a host array, None for any other model."""
    get = getattr(model, "master_host", None)
    return get() if get is not None else None


def requested_config(spec: str, max_seq_len: int = 1024) -> GPT2Config:
    """The model config -e asks for: a .bin file's header, Hugging Face weights
    ('hf:...'), or a descriptor's config."""
    if spec.startswith("hf:"):
        from .hf import import_hf
        return import_hf(spec[3:])[0]
    if spec.endswith(".bin") or os.path.sep in spec or os.path.exists(spec):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"model checkpoint {spec} not found; pass a .bin file written by "
                                    f"llmcu or llm.c, or a descriptor such as d6 or d12")
        return formats.read_model_header(spec)
    from .llama_config import model_config
    return model_config(spec, max_seq_len=max_seq_len)  # GPT-2 or Llama descriptor


def load_latest(out_dir: str, spec: str, rank: int = 0, num_processes: int = 1, zero_stage: int = 0,
                log=print):
    """(step, config, params, state) of the newest complete checkpoint in out_dir that
    reads and matches the model -e `spec` asks for, walking back past the ones that do
    not (each skipped one is logged with its reason); state is this rank's (data
    parallel: its own state file; with zero_stage 1 its shard of m and v). No usable
    checkpoint: a ValueError listing each one's reason and advice for the causes found."""
    steps = complete_steps(out_dir)
    if not steps:
        found = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
        listing = ("the directory does not exist" if found is None else
                   f"found {', '.join(found[:10]) + (' ...' if len(found) > 10 else '')}"
                   if found else "found an empty directory")
        raise ValueError(f"-y 1: no complete checkpoint in {out_dir}: expected DONE_%08d markers "
                         f"written by -n (with model_%08d.bin and state_%08d_00000.bin); {listing}. "
                         f"Train without -y 1 to start afresh.")
    # another world size or -z shows in the newest checkpoint's rank-0 state (every run has
    # one); every checkpoint of the run shares it, so it is refused rather than walked past
    newest = steps[-1]
    first_state, path = state_path(out_dir, newest, 0), model_path(out_dir, newest)
    try:
        from .distributed import resume_layout_error
        layout = resume_layout_error(first_state, requested_config(path).num_parameters(),
                                     num_processes, zero_stage)
    except (OSError, ValueError, IndexError):  # missing or damaged: the walk below says which
        layout = None
    if layout is not None:
        raise ValueError(layout)
    want = requested_config(spec)
    reasons = []  # (step, why, cause)
    for step in reversed(steps):
        try:
            return _load(out_dir, step, want, spec, rank, num_processes, zero_stage)
        except _Unusable as e:
            reasons.append((step, str(e), e.cause))
            log(f"-y 1: skipping checkpoint {step}: {e}")
    causes = {cause for _, _, cause in reasons}
    advice = []
    if "model" in causes:
        advice.append("pass the -e the run was started with, or another -o")
    if "layout" in causes:
        advice.append(f"resume with the number of processes and the -z the run was started with "
                      f"(this run: {num_processes} process(es), -z {zero_stage})")
    if "damaged" in causes:
        advice.append("the damaged files cannot be repaired: train without -y 1 to start afresh")
    raise ValueError(f"-y 1: no complete checkpoint in {out_dir} can be resumed: "
                     + "; ".join(f"step {st}: {why}" for st, why, _ in reasons)
                     + ". To do: " + "; ".join(advice))


class _Unusable(Exception):
    """A checkpoint resume cannot use; cause is "model", "layout" or "damaged"."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


def _load(out_dir, step, want, spec, rank, num_processes, zero_stage):
    """load_latest's read of the checkpoint at `step`, or _Unusable saying why."""
    path = model_path(out_dir, step)
    spath = state_path(out_dir, step, rank)
    for p in (path, spath):
        if not os.path.exists(p):
            raise _Unusable(f"{p} is missing", "damaged")
    try:
        config, params = formats.read_model(path)
    except formats.FormatError as e:
        raise _Unusable(str(e), "damaged") from None
    if config != want:
        raise _Unusable(f"{path} is another model: it holds {config}, but -e {spec} asks for "
                        f"{want}", "model")
    size = config.num_parameters()
    if zero_stage == 1:
        from .distributed import shard_range
        lo, hi, _ = shard_range(size, num_processes, rank)
        size = hi - lo
    try:
        state = formats.read_train_state(spath, size, num_processes, rank)
    except formats.FormatError as e:
        # another process count or -z shows as another rank layout or shard size
        layout = "process(es)" in str(e) or " parameters, expected " in str(e)
        raise _Unusable(str(e), "layout" if layout else "damaged") from None
    if state.step != step:
        raise _Unusable(f"{spath} holds step {state.step}, expected {step}", "damaged")
    return step, config, params, state


def restore(state: formats.TrainState, model, train_loader, rng, loss_detector, norm_detector,
            path: str = "the checkpoint") -> None:
    """Put the optimizer, loader, outlier windows and RNG back as the checkpoint saved them."""
    if state.B and (state.B, state.T) != (train_loader.B, train_loader.T):
        raise ValueError(f"-y 1: {path} was written with -b {state.B} -t {state.T}; resume with the "
                         f"same B and T (given -b {train_loader.B} -t {train_loader.T})")
    if state.window and state.window != loss_detector.window:
        raise ValueError(f"-y 1: {path} has outlier windows of {state.window} steps, this run "
                         f"uses {loss_detector.window}")
    if state.master is not None:  # a bf16 run's fp32 master weights (llm.c's -w 1)
        if master_weights(model) is None:
            raise ValueError(f"-y 1: {path} holds fp32 master weights (a --dtype bf16 -w 1 run); "
                             f"resume with --dtype bf16 -w 1")
        model.load_optimizer_state(state.m, state.v, master=state.master)
    else:
        model.load_optimizer_state(state.m, state.v)
    train_loader.load_state(state.loader)
    for det, values in ((loss_detector, state.loss_window), (norm_detector, state.norm_window)):
        det.values.clear()
        det.values.extend(values or [])
    if state.rng_state is not None:
        if state.rng_state.get("bit_generator") != type(rng.bit_generator).__name__:
            raise ValueError(f"-y 1: {path} holds a {state.rng_state.get('bit_generator')} RNG state, "
                             f"expected {type(rng.bit_generator).__name__}")
        rng.bit_generator.state = state.rng_state

