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
marker is ignored by resume. A checkpoint at step S holds the state at the top
of the loop's step S (before that step's eval and sample), so a resumed run
repeats exactly what the uninterrupted run did from there on.

Test hook: LLMCU_TEST_CRASH_IN_CHECKPOINT=S kills the process (SIGKILL) half-way
through writing the state file of the checkpoint at step S.
"""

from __future__ import annotations

import glob
import os
import re
import signal

from . import formats
from .config import GPT2Config

CRASH_ENV = "LLMCU_TEST_CRASH_IN_CHECKPOINT"


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
    m, v = model.optimizer_state()
    state = formats.TrainState(
        step=step, m=m, v=v, loader=train_loader.state(), B=train_loader.B, T=train_loader.T,
        window=loss_detector.window, loss_window=list(loss_detector.values),
        norm_window=list(norm_detector.values), rng_state=rng.bit_generator.state,
        num_processes=world, rank=rank, master=master_weights(model))
    if rank == 0:  # the parameters are the same on every rank
        formats.write_model(model_path(out_dir, step), config, model.params_host(),
                            dtype=model_file_dtype(model))
    formats.write_train_state(state_path(out_dir, step, rank), state, _midway=_crash_hook(step))
    if comm is not None:
        comm.barrier()  # every state file is in place before the marker
    if rank != 0:
        return
    with formats.atomic_write(done_path(out_dir, step)):
        pass
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
        if formats._peek_magic(spec) == formats.LLAMA_MODEL_MAGIC:
            return formats.read_llama_header(spec)
        with open(spec, "rb") as f:
            h = formats._read_header(f, spec, formats.MODEL_MAGIC,
                                     (formats.MODEL_VERSION_FP32, formats.MODEL_VERSION_BF16),
                                     "llm.c model checkpoint")
        return GPT2Config(max_seq_len=h[2], vocab_size=h[3], num_layers=h[4], num_heads=h[5],
                          channels=h[6], padded_vocab_size=h[7])
    from .llama_config import model_config
    return model_config(spec, max_seq_len=max_seq_len)  # GPT-2 or Llama descriptor


def load_latest(out_dir: str, spec: str, rank: int = 0, num_processes: int = 1, zero_stage: int = 0):
    """(step, config, params, state) of the newest complete checkpoint in out_dir,
    checked against the model that -e `spec` asks for; state is this rank's
    (data parallel: its own state file; with zero_stage 1 its shard of m and v)."""
    steps = complete_steps(out_dir)
    if not steps:
        found = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
        listing = ("the directory does not exist" if found is None else
                   f"found {', '.join(found[:10]) + (' ...' if len(found) > 10 else '')}"
                   if found else "found an empty directory")
        raise ValueError(f"-y 1: no complete checkpoint in {out_dir}: expected DONE_%08d markers "
                         f"written by -n (with model_%08d.bin and state_%08d_00000.bin); {listing}. "
                         f"Train without -y 1 to start afresh.")
    step = steps[-1]
    path = model_path(out_dir, step)
    first_state = state_path(out_dir, step, 0)  # every run has rank 0's: another world size shows there
    if os.path.exists(first_state) and os.path.exists(path):
        from .distributed import resume_layout_error
        layout = resume_layout_error(first_state, requested_config(path).num_parameters(),
                                     num_processes, zero_stage)
        if layout is not None:
            raise ValueError(layout)
    for p in (path, state_path(out_dir, step, rank)):
        if not os.path.exists(p):
            raise ValueError(f"-y 1: checkpoint {step} in {out_dir} has a DONE marker but {p} is "
                             f"missing; delete {done_path(out_dir, step)} to resume from the one before")
    want = requested_config(spec)
    config, params = formats.read_model(path)
    if config != want:
        raise ValueError(f"-y 1: the checkpoint {path} is another model: it holds {config}, "
                         f"but -e {spec} asks for {want}; pass the -e the run was started with, "
                         f"or another -o")
    spath = state_path(out_dir, step, rank)
    size = config.num_parameters()
    if zero_stage == 1:
        from .distributed import shard_range
        lo, hi, _ = shard_range(size, num_processes, rank)
        size = hi - lo
    try:
        state = formats.read_train_state(spath, size, num_processes, rank)
    except formats.FormatError as e:
        raise ValueError(f"-y 1: {e}; resume with the number of processes and the -z the run was "
                         f"started with") from None
    if state.step != step:
        raise ValueError(f"-y 1: {spath} holds step {state.step}, expected {step}")
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

