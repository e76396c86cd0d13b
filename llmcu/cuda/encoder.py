"""Token + position embedding on the kernels of kernels/encoder.cu.

Same functions and signatures as llmcu/cpu/encoder.py. Shapes: inp (B,T)
int32, wte (Vp,C), wpe (maxT,C), out (B,T,C), all floatX (float32, or uint16
holding bf16: the dtype of wte picks the kernel build). Parameter gradients
accumulate (+=).
"""

import numpy as np

from .runtime import FLOATX_NAMES, backend_of, check_array, floatx_dtype, i32, launch_config
from .vectorized import check_vectorized

FORWARD_VERSIONS = (1, 2)


def _check(fn, be, x, inp, wte, wpe):
    check_array(fn, "inp", inp, be, dtype=np.int32)
    if inp.ndim != 2:
        raise ValueError(f"{fn}: inp must be (B,T), got shape {inp.shape}")
    B, T = inp.shape
    dt = floatx_dtype(fn, "dwte" if fn.endswith("backward") else "wte", wte)
    check_array(fn, "wte", wte, be, dtype=dt)
    check_array(fn, "wpe", wpe, be, dtype=dt)
    if wte.ndim != 2 or wpe.ndim != 2 or wte.shape[1] != wpe.shape[1]:
        raise ValueError(f"{fn}: wte (Vp,C) and wpe (maxT,C) must share C, got {wte.shape} and {wpe.shape}")
    C = wte.shape[1]
    if T > wpe.shape[0]:
        raise ValueError(f"{fn}: T={T} exceeds maxT={wpe.shape[0]}")
    check_array(fn, "out" if fn.endswith("forward") else "dout", x, be, dtype=dt, shape=(B, T, C))
    return B, T, C, FLOATX_NAMES[dt]


def encoder_forward(out, inp, wte, wpe, version=1):
    """version=1: one element per thread (the default); version=2: 16-byte loads
    and stores, needs C % (16 // itemsize) == 0 and 16-byte aligned out, wte, wpe."""
    fn = "encoder_forward"
    if version not in FORWARD_VERSIONS:
        raise ValueError(f"{fn}: version must be one of {FORWARD_VERSIONS}, got {version!r}")
    be = backend_of(out)
    B, T, C, floatX = _check(fn, be, out, inp, wte, wpe)
    threads = B * T * C
    if version == 2:
        check_vectorized(fn, C, dict(out=out, wte=wte, wpe=wpe), what="channels (C)")
        threads //= 16 // out.dtype.itemsize
    grid, block = launch_config(threads)
    be.launch("encoder", f"encoder_forward_kernel{version}", grid, block,
              (out, inp, wte, wpe, i32(B), i32(T), i32(C)), floatX=floatX)


def encoder_backward(dwte, dwpe, dout, inp):
    be = backend_of(dout)
    B, T, C, floatX = _check("encoder_backward", be, dout, inp, dwte, dwpe)
    grid, block = launch_config(C, grid_y=2)  # blockIdx.y: 0 -> dwte, 1 -> dwpe
    be.launch("encoder", "encoder_backward_kernel1", grid, block,
              (dwte, dwpe, dout, inp, i32(B), i32(T), i32(C)), floatX=floatX)
