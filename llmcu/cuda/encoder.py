"""Token + position embedding on the kernels of kernels/encoder.cu.

Same functions and signatures as llmcu/cpu/encoder.py. Shapes: inp (B,T)
int32, wte (Vp,C), wpe (maxT,C), out (B,T,C), all floatX (float32, or uint16
holding bf16: the dtype of wte picks the kernel build). Parameter gradients
accumulate (+=).

The forward runs encoder_forward_kernel2 (16-byte loads and stores) where C %
(16 // itemsize) == 0 and out, wte, wpe are 16-byte aligned, else kernel1 (one
element per thread). The backward (kernels/encoder.cu, version 2) is
deterministic and parallel: dwpe: one thread per (t, packet of channels) sums
over b in order. dwte: the positions are sorted stably
     by token here (NumPy argsort(kind="stable") under emulation; cupy.argsort,
     which CuPy documents as a stable sort, on the GPU), and the block at the
     start of each token's run sums that token's dout rows in position order in
     fp32, then does one += into dwte. 16-byte loads when C % (16 // itemsize)
     == 0 and the arrays are 16-byte aligned, scalar loads otherwise.
     encoder_backward(..., token_runs=(order, end)) takes that sort ready-made
     (token_runs(host_inp) computes it with NumPy): the GPT-2 model sorts each
     batch on the host when it uploads it, so the step has no device sort
     (CuPy's allocates, which a captured CUDA graph cannot).
"""

import numpy as np

from .runtime import (FLOATX_NAMES, WARP, backend_of, check_array, floatx_dtype, i32,
                      launch_config)
from .vectorized import vectorizable

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


def encoder_forward(out, inp, wte, wpe):
    fn = "encoder_forward"
    be = backend_of(out)
    B, T, C, floatX = _check(fn, be, out, inp, wte, wpe)
    wide = vectorizable(C, dict(out=out, wte=wte, wpe=wpe))
    threads = B * T * C // (16 // out.dtype.itemsize if wide else 1)
    grid, block = launch_config(threads)
    be.launch("encoder", f"encoder_forward_kernel{2 if wide else 1}", grid, block,
              (out, inp, wte, wpe, i32(B), i32(T), i32(C)), floatX=floatX)


def encoder_backward(dwte, dwpe, dout, inp, token_runs=None):
    fn = "encoder_backward"
    be = backend_of(dout)
    B, T, C, floatX = _check(fn, be, dout, inp, dwte, dwpe)
    vec = 16 // dout.dtype.itemsize  # x128::size
    wide = vectorizable(C, dict(dwte=dwte, dwpe=dwpe, dout=dout))
    V = vec if wide else 1
    grid, block = launch_config(T * C // V)
    be.launch("encoder", "encoder_wpe_backward_kernel2", grid, block,
              (dwpe, dout, i32(B), i32(T), i32(C), i32(wide)), floatX=floatX)
    if token_runs is None:
        order, end = _token_runs(be, inp)
    else:
        order, end = token_runs
        for name, a in (("token_runs order", order), ("token_runs end", end)):
            check_array(fn, name, a, be, dtype=np.int32, shape=(B * T,))
    (tiles,), (block,) = launch_config(C // V, block=WARP)  # one warp per 32 packets of channels
    be.launch("encoder", "encoder_wte_backward_kernel2", (B * T, tiles), (block,),
              (dwte, dout, inp, order, end, i32(C), i32(wide)), floatX=floatX)


def _token_runs(be, inp):
    """(order, end), both (B*T,) int32: order = the positions (b*T + t) sorted stably
    by token id (one token's positions together, increasing); end[i] = one past the
    last sorted index whose token is the token at sorted index i."""
    xp = be.xp
    flat = inp.reshape(-1)
    if be.name == "cuda":
        order = xp.argsort(flat)  # CuPy documents argsort as a stable sort (thrust)
    else:
        order = np.argsort(flat, kind="stable")
    tokens = flat[order]
    end = xp.searchsorted(tokens, tokens, side="right")
    return order.astype(np.int32), end.astype(np.int32)


def token_runs(inp):
    """The (order, end) encoder_backward needs, from host token ids (B,T):
    both (B*T,) int32 NumPy arrays (see _token_runs)."""
    flat = np.ascontiguousarray(inp, dtype=np.int32).reshape(-1)
    order = np.argsort(flat, kind="stable")
    tokens = flat[order]
    end = np.searchsorted(tokens, tokens, side="right")
    return order.astype(np.int32), end.astype(np.int32)
