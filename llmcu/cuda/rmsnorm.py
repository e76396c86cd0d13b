"""RMSNorm on the kernels of kernels/rmsnorm.cu.

Same functions and signatures as llmcu/cpu/rmsnorm.py. Shapes: inp/out
(...,C) seen as N rows, weight (C,), rstd (...) float32. weight_offset is 0.0
for Llama, 1.0 for Gemma (scale by 1 + weight).
Parameter gradients accumulate (+=); activation gradients overwrite (=).
inp/out/weight and their gradients are floatX (float32, or uint16 holding
bf16: the dtype of inp picks the build); rstd is always float32.
"""

import numpy as np

from .runtime import (FLOATX_NAMES, backend_of, check_array, f32, floatx_dtype, i32, launch_config,
                      warp_per_row)

EPS = 1e-5


def _rows(fn, be, inp, **named):
    dt = floatx_dtype(fn, "inp", inp)
    check_array(fn, "inp", inp, be, dtype=dt)
    if inp.ndim < 1 or inp.size == 0:
        raise ValueError(f"{fn}: inp must have at least one row of C > 0 channels, got shape {inp.shape}")
    C = inp.shape[-1]
    N = inp.size // C
    for name, (a, shape) in named.items():
        check_array(fn, name, a, be, dtype=np.float32 if shape == "stat" else dt,
                    shape={"row": inp.shape, "stat": inp.shape[:-1], "C": (C,)}[shape])
    return N, C, FLOATX_NAMES[dt]


def rmsnorm_forward(out, rstd, inp, weight, eps=EPS, weight_offset=0.0):
    be = backend_of(inp)
    N, C, floatX = _rows("rmsnorm_forward", be, inp, out=(out, "row"), rstd=(rstd, "stat"),
                         weight=(weight, "C"))
    grid, block = warp_per_row(N)
    be.launch("rmsnorm", "rmsnorm_forward_kernel1", grid, block,
              (out, rstd, inp, weight, i32(N), i32(C), f32(eps), f32(weight_offset)), floatX=floatX)


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, weight_offset=0.0):
    be = backend_of(inp)
    N, C, floatX = _rows("rmsnorm_backward", be, inp, dinp=(dinp, "row"), dout=(dout, "row"),
                         dweight=(dweight, "C"), weight=(weight, "C"), rstd=(rstd, "stat"))
    grid, block = warp_per_row(N)
    be.launch("rmsnorm", "rmsnorm_backward_kernel1", grid, block,
              (dinp, dout, inp, weight, rstd, i32(N), i32(C), f32(weight_offset)), floatX=floatX)
    grid, block = launch_config(C)
    be.launch("rmsnorm", "rmsnorm_param_backward_kernel1", grid, block,
              (dweight, dout, inp, rstd, i32(N), i32(C)), floatX=floatX)
