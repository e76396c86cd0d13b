"""Causal multi-head self-attention, forward and backward (NumPy oracle).

Shapes: qkv (B,T,3C) holds q, k, v one after another along the last axis, each
split into NH heads of hs = C/NH channels; att (B,NH,T,T) caches the softmax
probabilities (masked entries 0) for the backward; out (B,T,C).
Activation gradients overwrite (=).
"""

import numpy as np


def _heads(qkv, num_heads):
    """Views q, k, v of shape (B,NH,T,hs) into qkv (B,T,3C)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    split = qkv.reshape(B, T, 3, num_heads, C // num_heads)
    return [split[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]


def _check(qkv, num_heads):
    C3 = qkv.shape[-1]
    if C3 % 3 != 0 or (C3 // 3) % num_heads != 0:
        raise ValueError(f"attention: qkv last axis must be 3*C with C divisible by "
                         f"num_heads={num_heads}, got {C3}")


def attention_forward(out, att, qkv, num_heads):
    """att = softmax(q k^T / sqrt(hs) with future positions masked); out = att v."""
    _check(qkv, num_heads)
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, num_heads)
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    np.matmul(q, k.transpose(0, 1, 3, 2), out=att)
    att *= scale
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    att[..., future] = -np.inf
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = att @ v  # (B,NH,T,hs)
    out.reshape(B, T, num_heads, -1)[...] = y.transpose(0, 2, 1, 3)


def attention_backward(dqkv, dout, qkv, att, num_heads):
    """Gradients wrt qkv through out = softmax(mask(q k^T * scale)) v."""
    _check(qkv, num_heads)
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, num_heads)
    dq, dk, dv = _heads(dqkv, num_heads)
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    dy = dout.reshape(B, T, num_heads, -1).transpose(0, 2, 1, 3)  # (B,NH,T,hs)
    dv[...] = att.transpose(0, 1, 3, 2) @ dy
    datt = dy @ v.transpose(0, 1, 3, 2)
    # softmax backward; masked entries have att == 0 so their gradient is 0
    dpre = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dpre *= scale
    dq[...] = dpre @ k
    dk[...] = dpre.transpose(0, 1, 3, 2) @ q
