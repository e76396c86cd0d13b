"""AdamW and the global gradient norm on kernels/adamw.cu and kernels/global_norm.cu.

Same functions and signatures as llmcu/cpu/adamw.py.
"""

import numpy as np

from ..cpu.adamw import clip_scale  # noqa: F401  (pure arithmetic, shared by both backends)
from .runtime import backend_of, check_array, f32, i64, launch_config

NORM_BLOCK = 1024
NORM_GRID = 264   # at most 2 blocks per SM of a 132-SM H100; fixed per size, so the sum order is fixed


def global_norm(grads):
    """sqrt(sum g^2): per-block partial sums on the device, summed in float64 on the host."""
    be = backend_of(grads)
    check_array("global_norm", "grads", grads, be)
    grid, block = launch_config(min(grads.size, NORM_GRID * NORM_BLOCK), NORM_BLOCK)
    partial = be.xp.empty(grid[0], dtype=np.float32)
    be.launch("global_norm", "global_norm_squared_kernel1", grid, block,
              (partial, grads, i64(grads.size)))
    return float(np.sqrt(np.sum(be.xp.asnumpy(partial) if be.name == "cuda" else partial,
                                dtype=np.float64)))


def adamw_update(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, grad_scale=1.0):
    if step < 1:
        raise ValueError(f"adamw_update: step is 1-based, got {step}")
    be = backend_of(params)
    for name, a in (("params", params), ("grads", grads), ("m", m), ("v", v)):
        check_array("adamw_update", name, a, be, shape=params.shape)
    grid, block = launch_config(params.size)
    be.launch("adamw", "adamw_kernel1", grid, block,
              (params, grads, m, v, i64(params.size), f32(lr), f32(beta1), f32(beta2),
               f32(1.0 - beta1 ** step), f32(1.0 - beta2 ** step), f32(eps), f32(weight_decay),
               f32(grad_scale)))
