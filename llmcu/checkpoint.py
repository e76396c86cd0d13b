"""Checkpoints of a training run, in llm.c's layout, and resuming from them.

A checkpoint at step S in the output dir is three files, written in this order:

    model_%08d.bin        the parameters, llm.c's model format (formats.write_model)
    state_%08d_00000.bin  AdamW m and v, the step, the train loader's position,
                          the outlier windows and the sampling RNG (formats.write_train_state;
                          llm.c writes one per process, we are rank 00000)
    DONE_%08d             an empty completion marker, written last

Each file is written to a temporary name and renamed, so a run killed at any
moment leaves every earlier checkpoint intact; a checkpoint without its DONE
marker is ignored by resume. A checkpoint at step S holds the state at the top
of the loop's step S (before that step's eval and sample), so a resumed run
repeats exactly what the uninterrupted run did from there on.

Test hook: LLMCU_TEST_CRASH_IN_CHECKPOINT=S kills the process (SIGKILL) half-way
through writing the state file of the checkpoint at step S.
"""

from __future__ import annotations

import os
import re
import signal

from . import formats
from .config import GPT2Config, gpt2_config

CRASH_ENV = "LLMCU_TEST_CRASH_IN_CHECKPOINT"
RANK = 0  # one process


def model_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"model_{step:08d}.bin")


def state_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"state_{step:08d}_{RANK:05d}.bin")


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
         keep: int = 0, log=print) -> None:
    """Write the checkpoint at `step` (model, state, then DONE); then, with keep > 0,
    delete the complete checkpoints older than the newest `keep`."""
    config = model.config
    m, v = model.optimizer_state()
    state = formats.TrainState(
        step=step, m=m, v=v, loader=train_loader.state(), B=train_loader.B, T=train_loader.T,
        window=loss_detector.window, loss_window=list(loss_detector.values),
        norm_window=list(norm_detector.values), rng_state=rng.bit_generator.state)
    formats.write_model(model_path(out_dir, step), config, model.params_host())
    formats.write_train_state(state_path(out_dir, step), state, _midway=_crash_hook(step))
    with formats.atomic_write(done_path(out_dir, step)):
        pass
    log(f"wrote checkpoint {model_path(out_dir, step)}, {state_path(out_dir, step)}")
    if keep > 0:
        steps = complete_steps(out_dir)
        kept = set(steps[-keep:]) | {step}
        for old in steps:
            if old in kept:
                continue
            # the marker goes first: a crash in between leaves an incomplete, ignored checkpoint
            for path in (done_path(out_dir, old), state_path(out_dir, old), model_path(out_dir, old)):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass


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
        with open(spec, "rb") as f:
            h = formats._read_header(f, spec, formats.MODEL_MAGIC,
                                     (formats.MODEL_VERSION_FP32, formats.MODEL_VERSION_BF16),
                                     "llm.c model checkpoint")
        return GPT2Config(max_seq_len=h[2], vocab_size=h[3], num_layers=h[4], num_heads=h[5],
                          channels=h[6], padded_vocab_size=h[7])
    return gpt2_config(spec, max_seq_len=max_seq_len)


def load_latest(out_dir: str, spec: str):
    """(step, config, params, state) of the newest complete checkpoint in out_dir,
    checked against the model that -e `spec` asks for."""
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
    for p in (path, state_path(out_dir, step)):
        if not os.path.exists(p):
            raise ValueError(f"-y 1: checkpoint {step} in {out_dir} has a DONE marker but {p} is "
                             f"missing; delete {done_path(out_dir, step)} to resume from the one before")
    want = requested_config(spec)
    config, params = formats.read_model(path)
    if config != want:
        raise ValueError(f"-y 1: the checkpoint {path} is another model: it holds {config}, "
                         f"but -e {spec} asks for {want}; pass the -e the run was started with, "
                         f"or another -o")
    state = formats.read_train_state(state_path(out_dir, step), config.num_parameters())
    if state.step != step:
        raise ValueError(f"-y 1: {state_path(out_dir, step)} holds step {state.step}, expected {step}")
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

