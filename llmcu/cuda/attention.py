"""Fused ("flash") causal self-attention on kernels/attention.cu.

Same functions and signatures as llmcu/cpu/attention.py's flash_attention_*:
qkv (B,T,(NH+2*NKV)*hs), out (B,T,NH*hs), lse (B,NH,T) float32 (the log-sum-exp of
each query row, all the backward keeps). Nothing of size T*T is allocated; the
backward uses one (B,NH,T) float32 scratch (D = rowsum(dout * out)). Activation
gradients overwrite (=).

The kernels follow the arrays (flash_kernel_version): version 3 (mma.sync tensor cores,
kernels/attention.cu) for bf16 (uint16 bit patterns) at head size 64, on the GPU and the
emulator alike; version 1 (fp32 scalar, any floatX, hs <= 128) otherwise. The other
versions are in the lab (kernels/dev/attention.cu, benchmarks/lab.py).
"""

import math

import numpy as np

from . import runtime
from .runtime import FLOATX_NAMES, check_array, backend_of, f32, floatx_dtype, i32, warp_per_row
from .vectorized import address

FLASH_TILE = 32      # = FLASH_TILE in kernels/attention.cu: rows per tile = threads per block (version 1)
FLASH_HS_MAX = 128   # = FLASH_HS_MAX there: the per-thread row buffers' size
FLASH3_TILE, FLASH3_THREADS, FLASH3_HS = 64, 128, 64   # version 3: 64-row tiles, 4 warps, hs 64
GROUPED = 0          # the kernels' trailing block order: 0 = blockIdx as is (the lab has others)


def flash_kernel_version(dtype, hs: int) -> int:
    """The attention kernels the step runs for these arrays: 3 for bf16 at hs = 64, else 1.
    Measured on an H200 (2026-11-28, B=16 NH=12 T=1024 hs=64, benchmarks/RESULTS.md):
    fwd+bwd 83.6 ms with version 1 and 0.758 ms with version 3."""
    return 3 if np.dtype(dtype) == np.uint16 and hs == FLASH3_HS else 1


def flash_heads(fn, be, qkv, num_heads, num_kv_heads, dtype):
    """qkv's checks (dtype, (B,T,(NH+2*NKV)*hs)): returns B, T, NH, NKV, hs (the lab's
    versions share them)."""
    check_array(fn, "qkv", qkv, be, dtype=dtype)
    NH = int(num_heads)
    NKV = NH if num_kv_heads is None else int(num_kv_heads)
    if NH <= 0 or NKV <= 0 or NH % NKV:
        raise ValueError(f"{fn}: num_heads={NH} must be a positive multiple of num_kv_heads={NKV}")
    if qkv.ndim != 3 or qkv.shape[-1] % (NH + 2 * NKV):
        raise ValueError(f"{fn}: qkv must be (B,T,(NH+2*NKV)*hs) = (B,T,{NH + 2 * NKV}*hs) for "
                         f"NH={NH}, NKV={NKV}, got shape {qkv.shape}")
    B, T, W = qkv.shape
    return B, T, NH, NKV, W // (NH + 2 * NKV)


def flash_arrays(fn, be, dtype, B, T, NH, NKV, hs, named, aligned=None):
    """The other arrays' checks: out/dout (B,T,NH*hs), dqkv like qkv, lse (B,NH,T) float32;
    aligned (the error's subject, e.g. "the bf16 hs=64 kernels move {name} in 16-byte pieces
    and need it"): every floatX array, qkv included, must start 16-byte aligned (cp.async)."""
    shapes = {"out": (B, T, NH * hs), "dout": (B, T, NH * hs), "dqkv": (B, T, (NH + 2 * NKV) * hs),
              "lse": (B, NH, T)}
    for name, a in named.items():
        if name != "qkv":
            check_array(fn, name, a, be, dtype=np.float32 if name == "lse" else dtype, shape=shapes[name])
    for name, a in named.items() if aligned else ():
        if name != "lse" and address(a) % 16:
            raise ValueError(f"{fn}: {aligned.format(name=name)} 16-byte aligned, got address "
                             f"{address(a):#x}; pass a fresh array")


def _flash_check(fn, be, qkv, num_heads, num_kv_heads, **named):
    """floatX arrays (float32, or uint16 holding bf16: qkv's dtype picks the build), hs <= 128;
    lse float32. Version 3 moves whole head rows in 16-byte pieces (cp.async), so there qkv,
    out, dout and dqkv must start 16-byte aligned (fresh arrays and GPT-2's activations do).
    Returns B, T, NH, NKV, hs, the floatX name of the module, and the kernel version."""
    dtype = floatx_dtype(fn, "qkv", qkv)
    B, T, NH, NKV, hs = flash_heads(fn, be, qkv, num_heads, num_kv_heads, dtype)
    if not 0 < hs <= FLASH_HS_MAX:
        raise ValueError(f"{fn}: head size hs must be in 1..{FLASH_HS_MAX}, got {hs}")
    version = flash_kernel_version(dtype, hs)
    flash_arrays(fn, be, dtype, B, T, NH, NKV, hs, {"qkv": qkv, **named},
                 "the bf16 hs=64 kernels move {name} in 16-byte pieces and need it" if version == 3 else None)
    return B, T, NH, NKV, hs, FLOATX_NAMES[dtype], version


def _tiles(version, T, heads, B):
    """Grid and block of a forward, dq or dkdv kernel: a block per 32-row (version 1) or
    64-row (version 3) tile of each head and batch row."""
    if version == 1:
        return (math.ceil(T / FLASH_TILE), heads, B), (FLASH_TILE,)
    return (math.ceil(T / FLASH3_TILE), heads, B), (FLASH3_THREADS,)


def flash_attention_forward(out, lse, qkv, num_heads, num_kv_heads=None):
    be = backend_of(qkv)
    B, T, NH, NKV, hs, floatX, version = _flash_check("flash_attention_forward", be, qkv, num_heads,
                                                      num_kv_heads, out=out, lse=lse)
    order = (i32(GROUPED),) if version == 3 else ()
    grid, block = _tiles(version, T, NH, B)
    be.launch("attention", f"attention_flash_forward_kernel{version}", grid, block,
              (out, lse, qkv, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), f32(1.0 / math.sqrt(hs))) + order,
              floatX=floatX)


def flash_attention_backward(dqkv, dout, qkv, out, lse, num_heads, num_kv_heads=None):
    be = backend_of(qkv)
    B, T, NH, NKV, hs, floatX, version = _flash_check("flash_attention_backward", be, qkv, num_heads,
                                                      num_kv_heads, dqkv=dqkv, dout=dout, out=out, lse=lse)
    D = runtime.scratch(be, "flash_D", (B, NH, T), np.float32)  # rowsum(dout * out), per call
    grid, block = warp_per_row(B * NH * T)
    be.launch("attention", "attention_flash_backward_preprocess_kernel1", grid, block,
              (D, dout, out, i32(B), i32(T), i32(NH), i32(hs)), floatX=floatX)
    order = (i32(GROUPED),) if version == 3 else ()
    args = (dqkv, dout, qkv, lse, D, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), f32(1.0 / math.sqrt(hs))) + order
    grid, block = _tiles(version, T, NH, B)
    be.launch("attention", f"attention_flash_backward_dq_kernel{version}", grid, block, args, floatX=floatX)
    grid, block = _tiles(version, T, NKV, B)
    be.launch("attention", f"attention_flash_backward_dkdv_kernel{version}", grid, block, args, floatX=floatX)
