"""LayerNorm on the kernels of kernels/layernorm.cu.

Same functions and signatures as llmcu/cpu/layernorm.py. Shapes: inp/out
(...,C) seen as N rows, weight/bias (C,), mean/rstd (...) float32.
Parameter gradients accumulate (+=); activation gradients overwrite (=).
inp/out/weight/bias and their gradients are floatX (float32, or uint16
holding bf16: the dtype of inp picks the build); mean/rstd are always float32.

layernorm_forward takes one keyword the CPU version lacks, version=, choosing
the kernel (see the top of kernels/layernorm.cu and docs/layernorm.md):
  0: one thread per row (the teaching version, slow);
  1: one warp per row, scalar loads (the default);
  2: one warp per row, 16-byte loads and stores; needs C % 4 == 0 (fp32) or
     C % 8 == 0 (bf16) and 16-byte aligned inp, out, weight and bias.
"""

import numpy as np

from .runtime import (FLOATX_NAMES, backend_of, check_array, f32, floatx_dtype, i32, launch_config,
                      warp_per_row)

EPS = 1e-5
FORWARD_VERSIONS = (0, 1, 2)


def _rows(fn, be, inp, **named):
    dt = floatx_dtype(fn, "inp", inp)
    check_array(fn, "inp", inp, be, dtype=dt)
    C = inp.shape[-1]
    N = inp.size // C
    for name, (a, shape) in named.items():
        check_array(fn, name, a, be, dtype=np.float32 if shape == "stat" else dt,
                    shape={"row": inp.shape, "stat": inp.shape[:-1], "C": (C,)}[shape])
    return N, C, FLOATX_NAMES[dt]


def _address(a) -> int:
    """The device (cupy) or host (numpy) address of a's first element."""
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=EPS, version=1):
    if version not in FORWARD_VERSIONS:
        raise ValueError(f"layernorm_forward: version must be one of {FORWARD_VERSIONS}, got {version!r}")
    be = backend_of(inp)
    N, C, floatX = _rows("layernorm_forward", be, inp, out=(out, "row"), mean=(mean, "stat"),
                         rstd=(rstd, "stat"), weight=(weight, "C"), bias=(bias, "C"))
    if version == 2:
        vec = 16 // inp.dtype.itemsize  # x128::size
        if C % vec != 0:
            raise ValueError(f"layernorm_forward: version 2 (16-byte loads) needs C % {vec} == 0, "
                             f"got C = {C}; use version=1")
        for name, a in (("out", out), ("inp", inp), ("weight", weight), ("bias", bias)):
            if _address(a) % 16 != 0:
                raise ValueError(f"layernorm_forward: version 2 needs {name} 16-byte aligned, "
                                 f"got address {_address(a):#x}; pass a fresh array or use version=1")
    grid, block = launch_config(N) if version == 0 else warp_per_row(N)
    be.launch("layernorm", f"layernorm_forward_kernel{version}", grid, block,
              (out, mean, rstd, inp, weight, bias, i32(N), i32(C), f32(eps)), floatX=floatX)


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    be = backend_of(inp)
    N, C, floatX = _rows("layernorm_backward", be, inp, dinp=(dinp, "row"), dout=(dout, "row"),
                         dweight=(dweight, "C"), dbias=(dbias, "C"), weight=(weight, "C"),
                         mean=(mean, "stat"), rstd=(rstd, "stat"))
    grid, block = warp_per_row(N)
    be.launch("layernorm", "layernorm_backward_kernel1", grid, block,
              (dinp, dout, inp, weight, mean, rstd, i32(N), i32(C)), floatX=floatX)
    grid, block = launch_config(C)
    be.launch("layernorm", "layernorm_param_backward_kernel1", grid, block,
              (dweight, dbias, dout, inp, mean, rstd, i32(N), i32(C)), floatX=floatX)
