"""Causal self-attention: permutes and the masked softmax are kernels from
kernels/attention.cu; the batched GEMMs go through the array library (cuBLAS
via CuPy on the GPU, NumPy under emulation).

Same functions and signatures as llmcu/cpu/attention.py. Shapes: qkv (B,T,3C),
att (B,NH,T,T) caches the probabilities (masked entries 0), out (B,T,C).
Activation gradients overwrite (=).
"""

import math

from .runtime import backend_of, check_array, f32, i32, launch_config, warp_per_row


def _check(fn, be, qkv, num_heads, **named):
    check_array(fn, "qkv", qkv, be)
    if qkv.ndim != 3 or qkv.shape[-1] % 3 or (qkv.shape[-1] // 3) % num_heads:
        raise ValueError(f"{fn}: qkv must be (B,T,3C) with C divisible by num_heads={num_heads}, "
                         f"got shape {qkv.shape}")
    B, T, C3 = qkv.shape
    C = C3 // 3
    shapes = {"out": (B, T, C), "dout": (B, T, C), "dqkv": (B, T, C3), "att": (B, num_heads, T, T)}
    for name, a in named.items():
        check_array(fn, name, a, be, shape=shapes[name])
    return B, T, C, num_heads, C // num_heads


def _split_heads(be, qkv, B, T, NH, hs):
    """q, k, v as (B,NH,T,hs) copies of qkv's three thirds."""
    q, k, v = (be.xp.empty((B, NH, T, hs), dtype=qkv.dtype) for _ in range(3))
    grid, block = launch_config(B * T * NH * hs)
    be.launch("attention", "attention_permute_kernel1", grid, block,
              (q, k, v, qkv, i32(B), i32(T), i32(NH), i32(hs)))
    return q, k, v


def attention_forward(out, att, qkv, num_heads):
    be = backend_of(qkv)
    B, T, C, NH, hs = _check("attention_forward", be, qkv, num_heads, out=out, att=att)
    xp = be.xp
    q, k, v = _split_heads(be, qkv, B, T, NH, hs)
    xp.matmul(q, k.transpose(0, 1, 3, 2), out=att)          # preatt, softmaxed in place
    grid, block = warp_per_row(B * NH * T)
    be.launch("attention", "attention_softmax_forward_kernel1", grid, block,
              (att, att, f32(1.0 / math.sqrt(hs)), i32(B * NH), i32(T)))
    y = xp.matmul(att, v)                                   # (B,NH,T,hs)
    grid, block = launch_config(B * T * C)
    be.launch("attention", "attention_unpermute_kernel1", grid, block,
              (out, y, i32(B), i32(T), i32(NH), i32(hs)))


def attention_backward(dqkv, dout, qkv, att, num_heads):
    be = backend_of(qkv)
    B, T, C, NH, hs = _check("attention_backward", be, qkv, num_heads, dqkv=dqkv, dout=dout, att=att)
    xp = be.xp
    q, k, v = _split_heads(be, qkv, B, T, NH, hs)
    dy = xp.empty((B, NH, T, hs), dtype=qkv.dtype)
    grid, block = launch_config(B * T * C)
    be.launch("attention", "attention_unpermute_backward_kernel1", grid, block,
              (dy, dout, i32(B), i32(T), i32(NH), i32(hs)))
    datt = xp.matmul(dy, v.transpose(0, 1, 3, 2))            # (B,NH,T,T), dpreatt in place below
    dv = xp.matmul(att.transpose(0, 1, 3, 2), dy)
    grid, block = warp_per_row(B * NH * T)
    be.launch("attention", "attention_softmax_backward_kernel1", grid, block,
              (datt, datt, att, f32(1.0 / math.sqrt(hs)), i32(B * NH), i32(T)))
    dq = xp.matmul(datt, k)
    dk = xp.matmul(datt.transpose(0, 1, 3, 2), q)
    grid, block = launch_config(B * T * 3 * C)
    be.launch("attention", "attention_permute_backward_kernel1", grid, block,
              (dqkv, dq, dk, dv, i32(B), i32(T), i32(NH), i32(hs)))
