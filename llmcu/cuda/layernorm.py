"""LayerNorm on the kernels of kernels/layernorm.cu.

Same functions and signatures as llmcu/cpu/layernorm.py. Shapes: inp/out
(...,C) seen as N rows, weight/bias (C,), mean/rstd (...) float32.
Parameter gradients accumulate (+=); activation gradients overwrite (=).
inp/out/weight/bias and their gradients are floatX (float32, or uint16
holding bf16: the dtype of inp picks the build); mean/rstd are always float32.

The kernels (kernels/layernorm.cu; the tutorial's versions 0 and 2 and the old
backward are in the lab, kernels/dev/layernorm.cu):
  layernorm_forward: one warp per row, scalar loads (layernorm_forward_kernel1);
  layernorm_backward: two passes, deterministic: one warp per row computes dinp and
     adds the row's dweight/dbias terms to its block's fp32 partial sums (16-byte
     loads when C % (16 // itemsize) == 0 and the arrays are 16-byte aligned,
     scalar loads otherwise), each block writes one partial row to a scratch
     buffer (at most runtime.PARTIAL_SUM_BLOCKS rows), and a second kernel sums
     the rows in a fixed order into dweight/dbias (one rounding for bf16).

Two fused ops the GPT-2 layer sequence (llmcu/cpu/gpt2.py) uses when its ops have
them; the NumPy oracle has no such functions (it runs the separate calls):
  residual_layernorm_forward(residual_out, ln_out, mean, rstd, inp1, inp2, weight,
      bias): residual_forward then the layernorm in one kernel, bit for bit the two
      calls (with 16-byte loads where C and the alignment allow);
  layernorm_backward_add(dres, dweight, dbias, dout, inp, weight, mean, rstd):
      layernorm_backward with dres += the input gradient (fp32, one
      rounding) instead of dinp =; replaces layernorm_backward + residual_forward.
"""

import numpy as np

from . import runtime
from .runtime import FLOATX_NAMES, WARP, backend_of, check_array, f32, floatx_dtype, i32, warp_per_row
from .vectorized import address, overlaps, vectorizable

EPS = 1e-5
# The backward's per-warp accumulators live in dynamic shared memory; staying within
# the 48 KiB a launch gets without an opt-in, a block has 8 warps up to C = 768
# (2 * 768 floats per warp) and fewer above.
BACKWARD2_SHARED_BYTES = 48 * 1024
BACKWARD2_MAX_WARPS = 8


def _rows(fn, be, inp, inp_name="inp", **named):
    dt = floatx_dtype(fn, inp_name, inp)
    check_array(fn, inp_name, inp, be, dtype=dt)
    C = inp.shape[-1]
    N = inp.size // C
    for name, (a, shape) in named.items():
        check_array(fn, name, a, be, dtype=np.float32 if shape == "stat" else dt,
                    shape={"row": inp.shape, "stat": inp.shape[:-1], "C": (C,)}[shape])
    return N, C, FLOATX_NAMES[dt]




def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=EPS):
    be = backend_of(inp)
    N, C, floatX = _rows("layernorm_forward", be, inp, out=(out, "row"), mean=(mean, "stat"),
                         rstd=(rstd, "stat"), weight=(weight, "C"), bias=(bias, "C"))
    grid, block = warp_per_row(N)
    be.launch("layernorm", "layernorm_forward_kernel1", grid, block,
              (out, mean, rstd, inp, weight, bias, i32(N), i32(C), f32(eps)), floatX=floatX)


def residual_layernorm_forward(residual_out, ln_out, mean, rstd, inp1, inp2, weight, bias, eps=EPS):
    """residual_out = inp1 + inp2 (rounded to floatX), then the layernorm of residual_out into
    ln_out, mean, rstd in one kernel: bit for bit residual_forward + layernorm_forward with
    scalar loads, or, where C % (16 // itemsize) == 0 and the floatX arrays are 16-byte
    aligned, with 16-byte loads (then the lab's 16-byte layernorm forward, kernel2).
    residual_out and ln_out must not overlap each other or any input."""
    fn = "residual_layernorm_forward"
    be = backend_of(inp1)
    N, C, floatX = _rows(fn, be, inp1, residual_out=(residual_out, "row"), ln_out=(ln_out, "row"),
                         inp2=(inp2, "row"), mean=(mean, "stat"), rstd=(rstd, "stat"),
                         weight=(weight, "C"), bias=(bias, "C"), inp_name="inp1")
    _check_no_overlap(fn, dict(residual_out=residual_out, ln_out=ln_out, mean=mean, rstd=rstd),
                      dict(inp1=inp1, inp2=inp2, weight=weight, bias=bias))
    packed = dict(residual_out=residual_out, ln_out=ln_out, inp1=inp1, inp2=inp2, weight=weight,
                  bias=bias)
    wide = vectorizable(C, packed)
    grid, block = warp_per_row(N)
    be.launch("layernorm", "residual_layernorm_forward_kernel1", grid, block,
              (residual_out, ln_out, mean, rstd, inp1, inp2, weight, bias, i32(N), i32(C), f32(eps),
               i32(wide)), floatX=floatX)


def _check_no_overlap(fn, outputs: dict, others: dict):
    """ValueError if an output's memory overlaps another output's or an input's (the
    kernels' pointers are __restrict__, and the fused kernels read what they write)."""
    named = list(outputs.items())
    for i, (name, a) in enumerate(named):
        for other, b in named[i + 1:] + list(others.items()):
            if overlaps(a, b):
                lo, blo = address(a), address(b)
                raise ValueError(f"{fn}: {name} must not overlap {other} (expected separate "
                                 f"buffers, found {name} at [{lo:#x}, {lo + a.nbytes:#x}) and {other} at "
                                 f"[{blo:#x}, {blo + b.nbytes:#x}))")


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    fn = "layernorm_backward"
    be = backend_of(inp)
    N, C, floatX = _rows(fn, be, inp, dinp=(dinp, "row"), dout=(dout, "row"),
                         dweight=(dweight, "C"), dbias=(dbias, "C"), weight=(weight, "C"),
                         mean=(mean, "stat"), rstd=(rstd, "stat"))
    _backward2(fn, be, dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C, floatX, add=False)


def layernorm_backward_add(dres, dweight, dbias, dout, inp, weight, mean, rstd):
    """layernorm_backward, with the input gradient ADDED into dres (dres += dinp, in fp32
    with one rounding to floatX) instead of overwriting a dinp: the GPT-2 backward's
    layernorm_backward(dtmp, ...) + residual_forward(dres, dres, dtmp) in one kernel.
    dweight/dbias accumulate as in layernorm_backward. dres must not overlap dout or inp."""
    fn = "layernorm_backward_add"
    be = backend_of(inp)
    N, C, floatX = _rows(fn, be, inp, dres=(dres, "row"), dout=(dout, "row"),
                         dweight=(dweight, "C"), dbias=(dbias, "C"), weight=(weight, "C"),
                         mean=(mean, "stat"), rstd=(rstd, "stat"))
    _check_no_overlap(fn, dict(dres=dres), dict(dout=dout, inp=inp))
    _backward2(fn, be, dres, dweight, dbias, dout, inp, weight, mean, rstd, N, C, floatX, add=True)


def _backward2(fn, be, dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C, floatX, add):
    """The backward's two launches; add: dinp += the input gradient instead of dinp =."""
    vec = 16 // inp.dtype.itemsize  # x128::size
    wide = vectorizable(C, dict(dinp=dinp, dout=dout, inp=inp, weight=weight))
    step = WARP * (vec if wide else 1)
    warp_bytes = 2 * (-(-C // step) * step) * 4  # 2 * CP floats (kernels/layernorm.cu)
    warps = min(BACKWARD2_MAX_WARPS, BACKWARD2_SHARED_BYTES // warp_bytes)
    if warps < 1:
        raise ValueError(f"{fn}: the backward keeps 2 * C floats per warp in shared memory, at most "
                         f"{BACKWARD2_SHARED_BYTES} bytes; C = {C} needs {warp_bytes}")
    blocks = runtime.partial_sums_grid(N, warps)
    scratch = runtime.partial_sums_scratch(be, (blocks, 2 * C))
    be.launch("layernorm", "layernorm_backward_kernel2", (blocks,), (warps * WARP,),
              (dinp, scratch, dout, inp, weight, mean, rstd, i32(N), i32(C), i32(wide), i32(add)),
              shared_mem=warps * warp_bytes, floatX=floatX)
    grid, block = runtime.column_tiles(2 * C)  # a block sums 32 of the 2C columns
    be.launch("layernorm", "layernorm_param_backward_reduce_kernel2", grid, block,
              (dweight, dbias, scratch, i32(blocks), i32(C)), floatX=floatX)

