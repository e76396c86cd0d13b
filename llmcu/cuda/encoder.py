"""Token + position embedding on the kernels of kernels/encoder.cu.

Same functions and signatures as llmcu/cpu/encoder.py. Shapes: inp (B,T)
int32, wte (Vp,C), wpe (maxT,C), out (B,T,C), all floatX (float32, or uint16
holding bf16: the dtype of wte picks the kernel build). Parameter gradients
accumulate (+=).

encoder_backward(..., version=) picks the kernels (kernels/encoder.cu):
  1: one thread per channel walks all B*T positions (2*C threads in all);
  2 (the default): deterministic and parallel. dwpe: one thread per (t, packet
     of channels) sums over b in order. dwte: the positions are sorted stably
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
from .vectorized import check_vectorized, vectorizable

FORWARD_VERSIONS = (1, 2)
BACKWARD_VERSIONS = (1, 2)


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
    and stores, needs C % (16 // itemsize) == 0 and 16-byte aligned out, wte, wpe;
    version="auto": 2 where it applies, else 1 (what the GPT-2 kernel model uses)."""
    fn = "encoder_forward"
    if version not in FORWARD_VERSIONS + ("auto",):
        raise ValueError(f"{fn}: version must be one of {FORWARD_VERSIONS} or 'auto', got {version!r}")
    be = backend_of(out)
    B, T, C, floatX = _check(fn, be, out, inp, wte, wpe)
    if version == "auto":
        version = 2 if vectorizable(C, dict(out=out, wte=wte, wpe=wpe)) else 1
    threads = B * T * C
    if version == 2:
        check_vectorized(fn, C, dict(out=out, wte=wte, wpe=wpe), what="channels (C)")
        threads //= 16 // out.dtype.itemsize
    grid, block = launch_config(threads)
    be.launch("encoder", f"encoder_forward_kernel{version}", grid, block,
              (out, inp, wte, wpe, i32(B), i32(T), i32(C)), floatX=floatX)


def encoder_backward(dwte, dwpe, dout, inp, version=2, token_runs=None):
    fn = "encoder_backward"
    if version not in BACKWARD_VERSIONS:
        raise ValueError(f"{fn}: version must be one of {BACKWARD_VERSIONS}, got {version!r}")
    be = backend_of(dout)
    B, T, C, floatX = _check(fn, be, dout, inp, dwte, dwpe)
    if version == 1:
        grid, block = launch_config(C, grid_y=2)  # blockIdx.y: 0 -> dwte, 1 -> dwpe
        be.launch("encoder", "encoder_backward_kernel1", grid, block,
                  (dwte, dwpe, dout, inp, i32(B), i32(T), i32(C)), floatX=floatX)
        return
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
    """The (order, end) encoder_backward's version 2 needs, from host token ids (B,T):
    both (B*T,) int32 NumPy arrays (see _token_runs)."""
    flat = np.ascontiguousarray(inp, dtype=np.int32).reshape(-1)
    order = np.argsort(flat, kind="stable")
    tokens = flat[order]
    end = np.searchsorted(tokens, tokens, side="right")
    return order.astype(np.int32), end.astype(np.int32)
