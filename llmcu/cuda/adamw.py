"""AdamW and the global gradient norm on kernels/adamw.cu and kernels/global_norm.cu.

Same functions and signatures as llmcu/cpu/adamw.py, plus two keywords for
mixed precision (llm.c's -w):

    adamw_update(params, grads, m, v, step, lr, ..., master_params=None, seed=None)

- fp32 params and grads, no master_params: adamw_kernel1, as the oracle.
- master_params (float32, same size): the update runs on the fp32 master copy
  (its result equals the oracle's on it) and params, floatX (uint16 = bf16
  bits, or float32), receive the new master values stochastically rounded.
- bf16 params without master_params: updated in fp32 and stochastically
  rounded back in place.
grads have the dtype of params; m and v are always float32. seed (32-bit)
drives the stochastic rounding through a hash of (seed, index): pass a new
one each step (default: the step number), or the rounding noise repeats.

global_norm takes fp32 or bf16 gradients and sums their squares in fp32.

For CUDA graphs (llmcu/cuda/graphs.py), where every scalar kernel argument is
baked in at capture, the per-step values live in device memory instead:

    table = adamw_tensor_table(xp, slices, decays)          # once
    hyper[...] = adamw_hyper(lr, step, beta1, beta2)        # each step, host -> device
    step_seed[...] = adamw_step_seed(seed, step)            # each step, host -> device
    global_norm_device(grads, norm, hyper[3:4], grad_clip)  # norm and clip scale, no sync
    adamw_multi_tensor(params, grads, m, v, table, hyper, step_seed, ...)  # one launch

adamw_multi_tensor's results equal the per-tensor adamw_update loop's
(llmcu/cpu/flat_adamw.update_parameters; mixed_precision.MixedPrecisionAdamW.update
with seed = rounding_seed(seed, step, t)) bit for bit.
"""

from dataclasses import dataclass

import numpy as np

from ..cpu.adamw import clip_scale  # noqa: F401  (pure arithmetic, shared by both backends)
from .runtime import (FLOAT32, FLOATX_NAMES, backend_of, block_per_row, check_array, f32,
                      floatx_dtype, i32, i64, launch_config, scratch)
from .vectorized import vectorizable

NORM_BLOCK = 1024
NORM_GRID = 264   # at most 2 blocks per SM of a 132-SM H100; fixed per size, so the sum order is fixed


def global_norm_device(grads, norm, grad_scale, grad_clip=None):
    """sqrt(sum g^2) into norm[0] (float64, shape (1,)) and the clipping factor
    clip_scale(norm, grad_clip) into grad_scale[0] (float32, shape (1,); any
    contiguous view, e.g. hyper[3:4] of adamw_multi_tensor's hyper), both on the
    device: per-block fp32 partial sums (global_norm_squared_kernel1), then one
    thread sums them in float64 in index order and does clip_scale's arithmetic
    (global_norm_finish_kernel1). No host sync; nothing is allocated after the
    first call for a given grads size (the partials are a runtime.scratch buffer),
    so a CUDA graph can capture it. grad_clip None or <= 0: no clipping (scale 1).
    (H200, 2026-11-28: fp32 74% of copy. The lab's 16-byte version 2 is not measured.)"""
    be, dt, clip = check_norm("global_norm_device", grads, norm, grad_scale, grad_clip)
    grid, block = launch_config(min(grads.size, NORM_GRID * NORM_BLOCK), NORM_BLOCK)
    partial = scratch(be, "global_norm_partial", grid, np.float32)
    be.launch("global_norm", "global_norm_squared_kernel1", grid, block,
              (partial, grads, i64(grads.size)), floatX=FLOATX_NAMES[dt])
    finish_norm(be, norm, grad_scale, partial, clip)


def check_norm(fn, grads, norm, grad_scale, grad_clip):
    """global_norm_device's argument checks (the lab's versions share them): returns the
    backend, the floatX dtype and the clip threshold as a float (0: no clipping)."""
    be = backend_of(grads)
    dt = floatx_dtype(fn, "grads", grads)
    check_array(fn, "grads", grads, be, dtype=dt)
    check_array(fn, "norm", norm, be, dtype=np.float64, shape=(1,))
    check_array(fn, "grad_scale", grad_scale, be, dtype=np.float32, shape=(1,))
    if grads.size == 0:
        raise ValueError(f"{fn}: grads must hold at least one element, got shape {grads.shape}")
    clip = 0.0 if grad_clip is None else float(grad_clip)
    if np.isnan(clip):
        raise ValueError(f"{fn}: grad_clip must be a number or None, got {grad_clip!r}")
    return be, dt, clip


def finish_norm(be, norm, grad_scale, partial, clip):
    """The norm and the clip scale from the squared kernel's per-block partial sums."""
    one_grid, one_block = launch_config(1, block=1)
    be.launch("global_norm", "global_norm_finish_kernel1", one_grid, one_block,
              (norm, grad_scale, partial, i32(partial.size), np.float64(clip)))


def global_norm(grads):
    """sqrt(sum g^2) as a Python float: global_norm_device into scratch buffers and
    one device-to-host read, so the eager norm and a graph's are computed alike."""
    be = backend_of(grads)
    norm = scratch(be, "global_norm_norm", (1,), np.float64)
    grad_scale = scratch(be, "global_norm_scale", (1,), np.float32)
    global_norm_device(grads, norm, grad_scale)
    return float(norm.get()[0] if be.name == "cuda" else norm[0])


# -- one launch over every parameter tensor (adamw_kernel4) ------------------------

# Elements per block of adamw_kernel4: 16 per thread of a 256-thread block. A
# chunk never straddles two tensors, so each tensor wastes at most one partly
# filled block (16 tensors in GPT-2 d12: noise next to its ~30k chunks), the
# table costs 12 bytes a chunk (~0.4 MB for 124M parameters), and the per-block
# work (four table reads, the seed's three hashes) is spread over 16 elements a
# thread while there are still ~30 blocks per SM of an H100 to balance the load.
# Not tuned: its speed is not measured on a GPU.
ADAMW_CHUNK = 4096
ADAMW_BLOCK = 256


@dataclass
class AdamWTable:
    """adamw_kernel4's launch table, device arrays of the backend it was built for:
    per chunk (block) its tensor id and first element, per tensor its first element
    (n_tensors + 1 entries, the last = n) and weight decay."""
    n: int                 # elements of the flat parameter array
    n_tensors: int
    n_chunks: int
    chunk: int             # elements per block (a tensor's last chunk may be shorter)
    chunk_tensor: object   # int32 (n_chunks,)
    chunk_start: object    # int64 (n_chunks,)
    tensor_start: object   # int64 (n_tensors + 1,)
    tensor_decay: object   # float32 (n_tensors,)
    starts: tuple = ()     # tensor_start on the host (whether 16-byte loads apply; () = unknown: no)


def adamw_tensor_table(xp, slices, decays, chunk=ADAMW_CHUNK) -> AdamWTable:
    """The launch table of adamw_multi_tensor for a flat parameter array cut into
    tensors by `slices` (Python slices in order, contiguous, from 0: e.g. those of
    config.parameter_slices) with weight decay decays[t] for tensor t (0.0 for the
    undecayed). Built once on the host, copied to the device (xp: numpy for the
    emulator, cupy for the GPU). An empty tensor gets no chunk (but keeps its id:
    the rounding seed of tensor t depends on t)."""
    fn = "adamw_tensor_table"
    slices, decays = list(slices), list(decays)
    if not slices:
        raise ValueError(f"{fn}: slices must name at least one tensor, got none")
    if len(decays) != len(slices):
        raise ValueError(f"{fn}: decays must have one entry per tensor ({len(slices)}), "
                         f"got {len(decays)}")
    if not isinstance(chunk, (int, np.integer)) or not 0 < int(chunk) < 2**31:
        raise ValueError(f"{fn}: chunk must be an int in [1, 2^31), got {chunk!r}")
    chunk = int(chunk)
    starts, offset = [], 0
    for t, sl in enumerate(slices):
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError(f"{fn}: slices[{t}] must be a slice with step 1, got {sl!r}")
        start = 0 if sl.start is None else sl.start
        if start != offset or sl.stop is None or sl.stop < start:
            raise ValueError(f"{fn}: slices must be contiguous from 0; slices[{t}] must start at "
                             f"{offset} and end at or after it, got {sl!r}")
        starts.append(start)
        offset = sl.stop
    if offset == 0:
        raise ValueError(f"{fn}: the tensors hold no elements")
    tensor_start = np.array(starts + [offset], dtype=np.int64)
    chunk_tensor = [np.full(-(-(b - a) // chunk), t, np.int32)
                    for t, (a, b) in enumerate(zip(tensor_start[:-1], tensor_start[1:]))]
    chunk_start = [np.arange(a, b, chunk, dtype=np.int64)
                   for a, b in zip(tensor_start[:-1], tensor_start[1:])]
    chunk_tensor, chunk_start = np.concatenate(chunk_tensor), np.concatenate(chunk_start)
    decay = np.array([float(d) for d in decays], dtype=np.float32)
    return AdamWTable(n=int(offset), n_tensors=len(slices), n_chunks=int(chunk_tensor.size),
                      chunk=chunk, chunk_tensor=xp.asarray(chunk_tensor),
                      chunk_start=xp.asarray(chunk_start), tensor_start=xp.asarray(tensor_start),
                      tensor_decay=xp.asarray(decay), starts=tuple(int(a) for a in tensor_start))


def adamw_shard_table(xp, slices, decays, lo, hi, chunk=ADAMW_CHUNK) -> AdamWTable:
    """adamw_tensor_table for ZeRO-1's shard [lo, hi) of the flat arrays: the launch
    then takes params[lo:hi], grads[lo:hi] and the shard's m, v and master (hi - lo
    elements each). Tensor starts are relative to lo (negative for a tensor that began
    before the shard; clamped to hi - lo for the ones after it) and tensor ids stay the
    whole model's, so adamw_kernel4's random bits random_u32(seed_t, i - tensor_start[t])
    are the global element's: a shard's stochastic rounding is the unsharded run's, bit
    for bit, whatever the world size. Only the pieces of tensors inside the shard get
    chunks."""
    fn = "adamw_shard_table"
    full = adamw_tensor_table(np, slices, decays, chunk)  # checks slices, decays and chunk
    if not 0 <= lo <= hi <= full.n:
        raise ValueError(f"{fn}: shard must satisfy 0 <= lo <= hi <= {full.n}, got ({lo}, {hi})")
    starts = np.array(full.starts, dtype=np.int64)
    n = hi - lo
    chunk_tensor, chunk_start = [], []
    for t in range(full.n_tensors):
        a, b = max(int(starts[t]), lo), min(int(starts[t + 1]), hi)
        if a < b:
            first = np.arange(a - lo, b - lo, chunk, dtype=np.int64)
            chunk_start.append(first)
            chunk_tensor.append(np.full(first.size, t, np.int32))
    if not chunk_start:
        raise ValueError(f"{fn}: the shard ({lo}, {hi}) holds no elements")
    relative = np.minimum(starts - lo, n)  # the kernel ends a chunk at min(start + chunk, next start)
    chunk_tensor, chunk_start = np.concatenate(chunk_tensor), np.concatenate(chunk_start)
    return AdamWTable(n=n, n_tensors=full.n_tensors, n_chunks=int(chunk_tensor.size), chunk=chunk,
                      chunk_tensor=xp.asarray(chunk_tensor), chunk_start=xp.asarray(chunk_start),
                      tensor_start=xp.asarray(relative),
                      tensor_decay=xp.asarray(np.asarray(full.tensor_decay)),
                      starts=tuple(int(a) for a in relative))


def adamw_hyper(lr, step, beta1=0.9, beta2=0.999) -> np.ndarray:
    """The per-step scalars of adamw_multi_tensor, a host float32 array to copy into
    its device `hyper`: [lr, 1 - beta1^step, 1 - beta2^step, grad_scale = 1.0],
    each rounded to float32 exactly as adamw_update rounds its kernel arguments.
    Slot 3 is the clip scale: global_norm_device(..., grad_scale=hyper[3:4]) overwrites it."""
    if step < 1:
        raise ValueError(f"adamw_hyper: step is 1-based, got {step}")
    return np.array([f32(lr), f32(1.0 - beta1 ** step), f32(1.0 - beta2 ** step), f32(1.0)],
                    dtype=np.float32)


def adamw_step_seed(seed, step) -> np.ndarray:
    """[seed, step] as a host uint32 array to copy into adamw_multi_tensor's device
    `step_seed`; the kernel derives each tensor's rounding seed from them as
    mixed_precision.rounding_seed(seed, step, t) does."""
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"adamw_step_seed: seed must be a 32-bit unsigned integer, got {seed}")
    if not 1 <= int(step) < 2**32:
        raise ValueError(f"adamw_step_seed: step must be in [1, 2^32), got {step}")
    return np.array([int(seed), int(step)], dtype=np.uint32)


def adamw_multi_tensor(params, grads, m, v, table, hyper, step_seed, beta1=0.9, beta2=0.999,
                       eps=1e-8, master_params=None):
    """One AdamW step on every tensor of the flat arrays in one launch (adamw_kernel4).

    params, grads: floatX (float32, or uint16 bf16 bits) of shape (table.n,);
    m, v and master_params (optional) float32 of that shape. table: from
    adamw_tensor_table. hyper: float32 (4,) on the device, adamw_hyper's values
    (slot 3 the clip scale); step_seed: uint32 (2,) on the device, [seed, step]
    (adamw_step_seed). Both are read by the kernel when it runs, so a captured
    graph replays with each step's values; beta1, beta2, eps are constant over a
    run and passed as arguments. Results: the per-tensor adamw_update loop's, bit
    for bit (fp32 without master weights: adamw_kernel1's arithmetic; otherwise
    kernel2's with seed rounding_seed(seed, step, t) for tensor t)."""
    fn = "adamw_multi_tensor"
    if not isinstance(table, AdamWTable):
        raise TypeError(f"{fn}: table must be an AdamWTable (adamw_tensor_table), "
                        f"got {type(table).__name__}")
    be = backend_of(params)
    dt = floatx_dtype(fn, "params", params)
    shape = (table.n,)
    if tuple(params.shape) != shape:
        raise ValueError(f"{fn}: params must have shape {shape} (the table's {table.n} elements), "
                         f"got {tuple(params.shape)}; build the table for these parameters")
    check_array(fn, "params", params, be, dtype=dt, shape=shape)
    check_array(fn, "grads", grads, be, dtype=dt, shape=shape)
    for name, a in (("m", m), ("v", v)):
        check_array(fn, name, a, be, dtype=np.float32, shape=shape)
    if master_params is not None:
        check_array(fn, "master_params", master_params, be, dtype=np.float32, shape=shape)
    check_array(fn, "hyper", hyper, be, dtype=np.float32, shape=(4,))
    check_array(fn, "step_seed", step_seed, be, dtype=np.uint32, shape=(2,))
    for name, dtype, size in (("chunk_tensor", np.int32, table.n_chunks),
                              ("chunk_start", np.int64, table.n_chunks),
                              ("tensor_start", np.int64, table.n_tensors + 1),
                              ("tensor_decay", np.float32, table.n_tensors)):
        check_array(fn, f"table.{name}", getattr(table, name), be, dtype=dtype, shape=(size,))
    # 16-byte loads where every tensor and every chunk starts on a packet and the arrays are
    # aligned: the same results (adamw_packet), fewer, wider memory transactions
    per_packet = 16 // params.dtype.itemsize
    wide = (bool(table.starts) and table.chunk % per_packet == 0
            and all(start % per_packet == 0 for start in table.starts)
            and vectorizable(per_packet, dict(params=params, grads=grads, m=m, v=v,
                                              master_params=master_params)))
    grid, block = block_per_row(table.n_chunks, ADAMW_BLOCK)
    be.launch("adamw", "adamw_kernel4", grid, block,
              (params, master_params, grads, m, v, table.chunk_tensor, table.chunk_start,
               table.tensor_start, table.tensor_decay, hyper, step_seed, f32(beta1), f32(beta2),
               f32(eps), i32(table.chunk), i32(wide)),
              floatX=FLOATX_NAMES[dt])


def check_update(fn, params, grads, m, v, step, master_params, seed):
    """adamw_update's argument checks (the lab's versions share them): returns the backend,
    the floatX dtype and the rounding seed (the step when seed is None)."""
    if step < 1:
        raise ValueError(f"{fn}: step is 1-based, got {step}")
    be = backend_of(params)
    dt = floatx_dtype(fn, "params", params)
    check_array(fn, "params", params, be, dtype=dt)
    check_array(fn, "grads", grads, be, dtype=dt, shape=params.shape)
    for name, a in (("m", m), ("v", v)):
        check_array(fn, name, a, be, dtype=np.float32, shape=params.shape)
    if master_params is not None:
        check_array(fn, "master_params", master_params, be, dtype=np.float32, shape=params.shape)
    seed = step if seed is None else seed
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"{fn}: seed must be a 32-bit unsigned integer, got {seed}")
    return be, dt, seed


def adamw_update(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, grad_scale=1.0, master_params=None, seed=None):
    """adamw_kernel1 for fp32 params without master weights (the oracle's arithmetic),
    adamw_kernel2 otherwise (mixed precision; the lab's kernel3 is its 16-byte form)."""
    be, dt, seed = check_update("adamw_update", params, grads, m, v, step, master_params, seed)
    grid, block = launch_config(params.size)
    scalars = (i64(params.size), f32(lr), f32(beta1), f32(beta2), f32(1.0 - beta1 ** step),
               f32(1.0 - beta2 ** step), f32(eps), f32(weight_decay), f32(grad_scale))
    if dt == FLOAT32 and master_params is None:
        be.launch("adamw", "adamw_kernel1", grid, block, (params, grads, m, v, *scalars))
    else:
        be.launch("adamw", "adamw_kernel2", grid, block,
                  (params, master_params, grads, m, v, *scalars, np.uint32(seed)),
                  floatX=FLOATX_NAMES[dt])
