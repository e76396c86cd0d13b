"""Causal multi-head self-attention, forward and backward (NumPy oracle).

Shapes: qkv (B,T,3C) holds q, k, v one after another along the last axis, each
split into NH heads of hs = C/NH channels; att (B,NH,T,T) caches the softmax
probabilities (masked entries 0) for the backward; out (B,T,C).
flash_attention_forward/backward (below) are the fused kernels' interface:
grouped-query heads, and a (B,NH,T) log-sum-exp saved instead of att.
Activation gradients overwrite (=).

attention_forward/backward treat each sequence b on its own, so they run on
blocks of the batch spread over the CPU threads (threads.rows with lead=1); the
functions with a leading underscore are the plain code each block runs.
"""

import numpy as np

from .threads import rows


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
    rows(_attention_forward, (out, att, qkv), num_heads, lead=1)


def _attention_forward(out, att, qkv, num_heads):
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, num_heads)
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    np.matmul(q, k.transpose(0, 1, 3, 2), out=att)
    att *= scale
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    np.copyto(att, np.float32(-np.inf), where=future)  # att[..., future] = -inf: 0.06 ms, not 0.3
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    np.matmul(att, v, out=out.reshape(B, T, num_heads, -1).transpose(0, 2, 1, 3))  # (B,NH,T,hs) view


def attention_backward(dqkv, dout, qkv, att, num_heads):
    """Gradients wrt qkv through out = softmax(mask(q k^T * scale)) v."""
    _check(qkv, num_heads)
    rows(_attention_backward, (dqkv, dout, qkv, att), num_heads, lead=1)


def _attention_backward(dqkv, dout, qkv, att, num_heads):
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, num_heads)
    dq, dk, dv = _heads(dqkv, num_heads)
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    dy = dout.reshape(B, T, num_heads, -1).transpose(0, 2, 1, 3)  # (B,NH,T,hs)
    np.matmul(att.transpose(0, 1, 3, 2), dy, out=dv)  # straight into dqkv's views, no copies
    datt = dy @ v.transpose(0, 1, 3, 2)
    # softmax backward; masked entries have att == 0 so their gradient is 0
    dpre = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dpre *= scale
    np.matmul(dpre, k, out=dq)
    np.matmul(dpre.transpose(0, 1, 3, 2), q, out=dk)


# --- fused ("flash") attention: the interface of the fused kernels -----------
#
# qkv (B,T,(NH+2*NKV)*hs): NH query heads, then NKV key heads, then NKV value
# heads, each hs wide (NKV = NH is GPT-2's (B,T,3C) layout); query head h reads
# kv head h // (NH // NKV) (grouped-query attention). out (B,T,NH*hs);
# lse (B,NH,T) float32 = log-sum-exp over j <= t of the scaled scores
# s[t,j] = q_t . k_j / sqrt(hs): all the backward needs besides qkv and out,
# instead of the (B,NH,T,T) probabilities. The oracle still materialises the
# scores (it is the reference, not the memory-saving implementation).


def _flash_dims(fn, qkv, num_heads, num_kv_heads, **named):
    NH = int(num_heads)
    NKV = NH if num_kv_heads is None else int(num_kv_heads)
    if qkv.ndim != 3:
        raise ValueError(f"{fn}: qkv must be (B,T,(NH+2*NKV)*hs), got shape {qkv.shape}")
    if NH <= 0 or NKV <= 0 or NH % NKV != 0:
        raise ValueError(f"{fn}: num_heads={NH} must be a positive multiple of num_kv_heads={NKV}")
    width = qkv.shape[-1]
    if width % (NH + 2 * NKV) != 0:
        raise ValueError(f"{fn}: qkv last axis must be (NH+2*NKV)*hs = {NH + 2 * NKV}*hs "
                         f"(NH={NH}, NKV={NKV}), got {width}")
    B, T, _ = qkv.shape
    hs = width // (NH + 2 * NKV)
    shapes = {"out": (B, T, NH * hs), "dout": (B, T, NH * hs), "lse": (B, NH, T), "dqkv": qkv.shape}
    for name, a in named.items():
        if tuple(a.shape) != tuple(shapes[name]):
            raise ValueError(f"{fn}: {name} must have shape {tuple(shapes[name])}, got {tuple(a.shape)}")
    return B, T, NH, NKV, hs


def _flash_heads(qkv, B, T, NH, NKV, hs):
    """Views q (B,NH,T,hs), k and v (B,NKV,T,hs) into qkv."""
    q = qkv[..., :NH * hs].reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    k = qkv[..., NH * hs:(NH + NKV) * hs].reshape(B, T, NKV, hs).transpose(0, 2, 1, 3)
    v = qkv[..., (NH + NKV) * hs:].reshape(B, T, NKV, hs).transpose(0, 2, 1, 3)
    return q, k, v


def _flash_scores(q, k, NH, NKV, hs):
    """Scaled, causally masked scores (B,NKV,G,T,T) with G = NH/NKV query heads per kv head."""
    B, _, T, _ = q.shape
    G = NH // NKV
    qg = q.reshape(B, NKV, G, T, hs)
    s = np.matmul(qg, k[:, :, None].transpose(0, 1, 2, 4, 3))
    s *= np.float32(1.0 / np.sqrt(hs))
    s[..., np.triu(np.ones((T, T), dtype=bool), k=1)] = -np.inf
    return s


def flash_attention_forward(out, lse, qkv, num_heads, num_kv_heads=None):
    """out = softmax(mask(q k^T / sqrt(hs))) v per query head; lse = log-sum-exp of each row."""
    B, T, NH, NKV, hs = _flash_dims("flash_attention_forward", qkv, num_heads, num_kv_heads,
                                     out=out, lse=lse)
    q, k, v = _flash_heads(qkv, B, T, NH, NKV, hs)
    G = NH // NKV
    s = _flash_scores(q, k, NH, NKV, hs)                     # (B,NKV,G,T,T)
    m = s.max(axis=-1, keepdims=True)                        # finite: column 0 is never masked
    p = np.exp(s - m)
    total = p.sum(axis=-1, keepdims=True)
    lse.reshape(B, NKV, G, T)[...] = (m + np.log(total))[..., 0]
    p /= total
    y = np.matmul(p, v[:, :, None])                          # (B,NKV,G,T,hs)
    out.reshape(B, T, NH, hs)[...] = y.reshape(B, NH, T, hs).transpose(0, 2, 1, 3)


def flash_attention_backward(dqkv, dout, qkv, out, lse, num_heads, num_kv_heads=None):
    """dqkv (overwritten) through out = softmax(mask(q k^T * scale)) v, recomputing the
    probabilities from lse: p = exp(s - lse). With D_t = dout_t . out_t,
    ds = p * (dout v^T - D), dq = scale * ds k, dk = scale * ds^T q, dv = p^T dout,
    dk and dv summed over the G query heads sharing a kv head."""
    B, T, NH, NKV, hs = _flash_dims("flash_attention_backward", qkv, num_heads, num_kv_heads,
                                     dqkv=dqkv, dout=dout, out=out, lse=lse)
    q, k, v = _flash_heads(qkv, B, T, NH, NKV, hs)
    dq, dk, dv = _flash_heads(dqkv, B, T, NH, NKV, hs)
    G = NH // NKV
    scale = np.float32(1.0 / np.sqrt(hs))
    s = _flash_scores(q, k, NH, NKV, hs)
    p = np.exp(s - lse.reshape(B, NKV, G, T)[..., None])     # masked: exp(-inf) = 0
    dy = dout.reshape(B, T, NKV, G, hs).transpose(0, 2, 3, 1, 4)   # (B,NKV,G,T,hs)
    y = out.reshape(B, T, NKV, G, hs).transpose(0, 2, 3, 1, 4)
    D = (dy * y).sum(axis=-1, keepdims=True)                 # (B,NKV,G,T,1)
    dv[...] = np.matmul(p.transpose(0, 1, 2, 4, 3), dy).sum(axis=2)
    ds = p * (np.matmul(dy, v[:, :, None].transpose(0, 1, 2, 4, 3)) - D)
    ds *= scale
    dq[...] = np.matmul(ds, k[:, :, None]).reshape(B, NH, T, hs)
    dk[...] = np.matmul(ds.transpose(0, 1, 2, 4, 3), q.reshape(B, NKV, G, T, hs)).sum(axis=2)
