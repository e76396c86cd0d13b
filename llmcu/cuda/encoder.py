"""Token + position embedding on the kernels of kernels/encoder.cu.

Same functions and signatures as llmcu/cpu/encoder.py. Shapes: inp (B,T)
int32, wte (Vp,C), wpe (maxT,C), out (B,T,C). Parameter gradients accumulate (+=).
"""

import numpy as np

from .runtime import backend_of, check_array, i32, launch_config


def _check(fn, be, x, inp, wte, wpe):
    check_array(fn, "inp", inp, be, dtype=np.int32)
    if inp.ndim != 2:
        raise ValueError(f"{fn}: inp must be (B,T), got shape {inp.shape}")
    B, T = inp.shape
    check_array(fn, "wte", wte, be)
    check_array(fn, "wpe", wpe, be)
    if wte.ndim != 2 or wpe.ndim != 2 or wte.shape[1] != wpe.shape[1]:
        raise ValueError(f"{fn}: wte (Vp,C) and wpe (maxT,C) must share C, got {wte.shape} and {wpe.shape}")
    C = wte.shape[1]
    if T > wpe.shape[0]:
        raise ValueError(f"{fn}: T={T} exceeds maxT={wpe.shape[0]}")
    check_array(fn, "out" if fn.endswith("forward") else "dout", x, be, shape=(B, T, C))
    return B, T, C


def encoder_forward(out, inp, wte, wpe):
    be = backend_of(out)
    B, T, C = _check("encoder_forward", be, out, inp, wte, wpe)
    grid, block = launch_config(B * T * C)
    be.launch("encoder", "encoder_forward_kernel1", grid, block,
              (out, inp, wte, wpe, i32(B), i32(T), i32(C)))


def encoder_backward(dwte, dwpe, dout, inp):
    be = backend_of(dout)
    B, T, C = _check("encoder_backward", be, dout, inp, dwte, dwpe)
    grid, block = launch_config(C, grid_y=2)  # blockIdx.y: 0 -> dwte, 1 -> dwpe
    be.launch("encoder", "encoder_backward_kernel1", grid, block,
              (dwte, dwpe, dout, inp, i32(B), i32(T), i32(C)))
