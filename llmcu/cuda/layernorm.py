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

layernorm_backward takes version= too:
  1: one warp per row for dinp, then one thread per column walking every row
     for dweight/dbias (the oracle's order; only C threads);
  2 (the default): two passes, deterministic: one warp per row computes dinp and
     adds the row's dweight/dbias terms to its block's fp32 partial sums (16-byte
     loads when C % (16 // itemsize) == 0 and the arrays are 16-byte aligned,
     scalar loads otherwise), each block writes one partial row to a scratch
     buffer (at most runtime.PARTIAL_SUM_BLOCKS rows), and a second kernel sums
     the rows in a fixed order into dweight/dbias (one rounding for bf16).
"""

import numpy as np

from . import runtime
from .runtime import (FLOATX_NAMES, WARP, backend_of, check_array, f32, floatx_dtype, i32,
                      launch_config, warp_per_row)
from .vectorized import vectorizable

EPS = 1e-5
FORWARD_VERSIONS = (0, 1, 2)
BACKWARD_VERSIONS = (1, 2)
# Version 2's per-warp accumulators live in dynamic shared memory; staying within
# the 48 KiB a launch gets without an opt-in, a block has 8 warps up to C = 768
# (2 * 768 floats per warp) and fewer above.
BACKWARD2_SHARED_BYTES = 48 * 1024
BACKWARD2_MAX_WARPS = 8


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


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, version=2):
    fn = "layernorm_backward"
    if version not in BACKWARD_VERSIONS:
        raise ValueError(f"{fn}: version must be one of {BACKWARD_VERSIONS}, got {version!r}")
    be = backend_of(inp)
    N, C, floatX = _rows(fn, be, inp, dinp=(dinp, "row"), dout=(dout, "row"),
                         dweight=(dweight, "C"), dbias=(dbias, "C"), weight=(weight, "C"),
                         mean=(mean, "stat"), rstd=(rstd, "stat"))
    if version == 1:
        grid, block = warp_per_row(N)
        be.launch("layernorm", "layernorm_backward_kernel1", grid, block,
                  (dinp, dout, inp, weight, mean, rstd, i32(N), i32(C)), floatX=floatX)
        grid, block = launch_config(C)
        be.launch("layernorm", "layernorm_param_backward_kernel1", grid, block,
                  (dweight, dbias, dout, inp, mean, rstd, i32(N), i32(C)), floatX=floatX)
        return
    vec = 16 // inp.dtype.itemsize  # x128::size
    wide = vectorizable(C, dict(dinp=dinp, dout=dout, inp=inp, weight=weight))
    step = WARP * (vec if wide else 1)
    warp_bytes = 2 * (-(-C // step) * step) * 4  # 2 * CP floats (kernels/layernorm.cu)
    warps = min(BACKWARD2_MAX_WARPS, BACKWARD2_SHARED_BYTES // warp_bytes)
    if warps < 1:
        raise ValueError(f"{fn}: version 2 keeps 2 * C floats per warp in shared memory, at most "
                         f"{BACKWARD2_SHARED_BYTES} bytes; C = {C} needs {warp_bytes}; use version=1")
    blocks = runtime.partial_sums_grid(N, warps)
    scratch = runtime.partial_sums_scratch(be, (blocks, 2 * C))
    be.launch("layernorm", "layernorm_backward_kernel2", (blocks,), (warps * WARP,),
              (dinp, scratch, dout, inp, weight, mean, rstd, i32(N), i32(C), i32(wide)),
              shared_mem=warps * warp_bytes, floatX=floatX)
    grid, block = runtime.column_tiles(2 * C)  # a block sums 32 of the 2C columns
    be.launch("layernorm", "layernorm_param_backward_reduce_kernel2", grid, block,
              (dweight, dbias, scratch, i32(blocks), i32(C)), floatX=floatX)

