"""Rotary position embeddings on the kernels of kernels/rope.cu.

Same functions and signatures as llmcu/cpu/rope.py (rope_frequencies is the
oracle's: the tables are computed once on the host; pass them to the GPU with
cupy.asarray). Shapes: inp/out (B,T,(NH+2*NKV)*hs), cos/sin (>= T, hs/2)
float32. out may be inp (in place). Activation gradients overwrite (=).
inp/out are floatX (float32, or uint16 holding bf16: the dtype of inp picks
the build); the cos/sin tables are always float32.
"""

import numpy as np


from ..cpu.rope import rope_frequencies  # one formula, one place
from .runtime import FLOATX_NAMES, backend_of, check_array, floatx_dtype, i32, launch_config

__all__ = ["rope_frequencies", "rope_forward", "rope_backward"]


def _check(fn, out_name, out, inp_name, inp, cos, sin, num_heads, num_kv_heads):
    be = backend_of(inp)
    dt = floatx_dtype(fn, inp_name, inp)
    check_array(fn, inp_name, inp, be, dtype=dt)
    if inp.ndim != 3:
        raise ValueError(f"{fn}: {inp_name} must be 3-D (B, T, (NH+2*NKV)*hs), got shape {inp.shape}")
    check_array(fn, out_name, out, be, dtype=dt, shape=inp.shape)
    NH = int(num_heads)
    NKV = NH if num_kv_heads is None else int(num_kv_heads)
    if NH < 1 or NKV < 1:
        raise ValueError(f"{fn}: num_heads and num_kv_heads must be >= 1, got {NH} and {NKV}")
    B, T, W = inp.shape
    heads = NH + 2 * NKV
    if W % heads != 0 or (W // heads) % 2 != 0 or W == 0:
        raise ValueError(f"{fn}: {inp_name} last axis must be (NH+2*NKV)*hs = {heads}*hs with hs "
                         f"even and > 0 (NH={NH}, NKV={NKV}), got {W}")
    hs = W // heads
    for name, a in (("cos", cos), ("sin", sin)):
        check_array(fn, name, a, be, dtype=np.float32)
        if a.ndim != 2 or a.shape[0] < T or a.shape[1] != hs // 2:
            raise ValueError(f"{fn}: {name} must have shape (>= T, hs/2) = (>= {T}, {hs // 2}), "
                             f"got {tuple(a.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"{fn}: cos and sin must have the same shape, got {cos.shape} and {sin.shape}")
    return be, B, T, NH, NKV, hs, FLOATX_NAMES[dt]


def rope_forward(out, inp, cos, sin, num_heads, num_kv_heads=None):
    be, B, T, NH, NKV, hs, floatX = _check("rope_forward", "out", out, "inp", inp, cos, sin,
                                   num_heads, num_kv_heads)
    grid, block = launch_config(B * T * (NH + 2 * NKV) * hs // 2)
    be.launch("rope", "rope_forward_kernel1", grid, block,
              (out, inp, cos, sin, i32(B), i32(T), i32(NH), i32(NKV), i32(hs)), floatX=floatX)


def rope_backward(dinp, dout, cos, sin, num_heads, num_kv_heads=None):
    be, B, T, NH, NKV, hs, floatX = _check("rope_backward", "dinp", dinp, "dout", dout, cos, sin,
                                   num_heads, num_kv_heads)
    grid, block = launch_config(B * T * (NH + 2 * NKV) * hs // 2)
    be.launch("rope", "rope_backward_kernel1", grid, block,
              (dinp, dout, cos, sin, i32(B), i32(T), i32(NH), i32(NKV), i32(hs)), floatX=floatX)
