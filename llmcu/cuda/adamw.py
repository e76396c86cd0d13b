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
"""

import numpy as np

from ..cpu.adamw import clip_scale  # noqa: F401  (pure arithmetic, shared by both backends)
from .runtime import (FLOAT32, FLOATX_NAMES, backend_of, check_array, f32, floatx_dtype, i64,
                      launch_config)
from .vectorized import check_vectorized

NORM_BLOCK = 1024
NORM_GRID = 264   # at most 2 blocks per SM of a 132-SM H100; fixed per size, so the sum order is fixed


def global_norm(grads):
    """sqrt(sum g^2): per-block partial sums on the device, summed in float64 on the host."""
    be = backend_of(grads)
    dt = floatx_dtype("global_norm", "grads", grads)
    check_array("global_norm", "grads", grads, be, dtype=dt)
    grid, block = launch_config(min(grads.size, NORM_GRID * NORM_BLOCK), NORM_BLOCK)
    partial = be.xp.empty(grid[0], dtype=np.float32)
    be.launch("global_norm", "global_norm_squared_kernel1", grid, block,
              (partial, grads, i64(grads.size)), floatX=FLOATX_NAMES[dt])
    return float(np.sqrt(np.sum(be.xp.asnumpy(partial) if be.name == "cuda" else partial,
                                dtype=np.float64)))


def adamw_update(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, grad_scale=1.0, master_params=None, seed=None, version=None):
    """version: None picks kernel1 for fp32 without master weights, else kernel2;
    3 is kernel2 with 16-byte loads (needs params.size % (16 // itemsize) == 0
    and 16-byte aligned arrays; results identical to kernel2's)."""
    fn = "adamw_update"
    if version not in (None, 1, 2, 3):
        raise ValueError(f"{fn}: version must be None, 1, 2 or 3, got {version!r}")
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
    if seed is None:
        seed = step
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"{fn}: seed must be a 32-bit unsigned integer, got {seed}")
    if version is None:
        version = 1 if dt == FLOAT32 and master_params is None else 2
    if version == 1 and (dt != FLOAT32 or master_params is not None):
        raise ValueError(f"{fn}: version 1 is fp32 without master weights; got params {dt} and "
                         f"master_params {'given' if master_params is not None else 'None'}")
    threads = params.size
    if version == 3:
        threads = check_vectorized(fn, params.size, dict(params=params, grads=grads, m=m, v=v,
                                                         master_params=master_params))
    grid, block = launch_config(threads)
    scalars = (i64(params.size), f32(lr), f32(beta1), f32(beta2), f32(1.0 - beta1 ** step),
               f32(1.0 - beta2 ** step), f32(eps), f32(weight_decay), f32(grad_scale))
    if version == 1:
        be.launch("adamw", "adamw_kernel1", grid, block, (params, grads, m, v, *scalars))
    else:
        be.launch("adamw", f"adamw_kernel{version}", grid, block,
                  (params, master_params, grads, m, v, *scalars, np.uint32(seed)),
                  floatX=FLOATX_NAMES[dt])
