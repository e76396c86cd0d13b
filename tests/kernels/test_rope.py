"""Rotary position embeddings, the product kernels (kernels/rope.cu, llmcu/cuda/rope.py),
against the NumPy oracle (llmcu/cpu/rope.py), fp32 and bf16: rope_forward_kernel1 and
rope_backward_kernel1, one thread per rotated pair, over qkv (B,T,(NH+2*NKV)*hs): the query
and key heads are rotated, the value heads copied. Inputs are random, outputs NaN-poisoned;
the cos/sin tables (fp32 in both dtypes) are longer than T.

Tolerances: rope is two products and one add per element; the only difference possible is
an FMA contraction by the GPU compiler (one rounding fewer), <= 1 ulp of values ~3: fp32
atol = rtol = 1e-6; bf16 one rounding of that fp32 result (tests/helpers.py out_tol). Value
heads are copies: bit for bit.
"""

import numpy as np
import pytest

from helpers import BF16, FP32, assert_close, assert_same_bits, out_tol, rand_x, value
from llmcu.cpu import rope as cpu_rope

ROPE_TOL = dict(atol=1e-6, rtol=1e-6)


def _kernels():
    from llmcu.cuda import rope
    return rope


# (dtype, B, T, NH, NKV, hs): grouped-query, multi-query with the smallest head (hs = 2),
# Gemma's hs = 256; one bf16 case. Tolerances: fp32 ROPE_TOL, bf16 out_tol (module doc).
@pytest.mark.parametrize("dtype,B,T,NH,NKV,hs", [
    pytest.param(FP32, 2, 7, 4, 2, 16, id="fp32-gqa"),
    pytest.param(FP32, 1, 3, 3, 1, 2, id="fp32-mqa-hs2"),
    pytest.param(FP32, 1, 9, 2, 1, 256, id="fp32-hs256"),
    pytest.param(BF16, 2, 7, 4, 2, 16, id="bf16-gqa"),
])
def test_rope(dev, dtype, B, T, NH, NKV, hs):
    k = _kernels()
    rng = np.random.default_rng(NH * 100 + NKV * 10 + hs)
    W = (NH + 2 * NKV) * hs
    cos, sin = cpu_rope.rope_frequencies(hs, T + 5, 10000.0)  # a table longer than T
    for direction in ("forward", "backward"):
        x, x_f = rand_x(rng, dtype, B, T, W)
        out = dev.poisoned((B, T, W), dtype)
        getattr(k, f"rope_{direction}")(out, dev.put(x), dev.put(cos), dev.put(sin), NH, NKV)
        ref = np.empty((B, T, W), np.float32)
        getattr(cpu_rope, f"rope_{direction}")(ref, x_f, cos, sin, NH, NKV)
        tol = ROPE_TOL if dtype == FP32 else out_tol(dtype, ref)
        assert_close(f"rope_{direction}", value(dev.get(out)), ref, **tol)
        assert_same_bits(f"rope_{direction}: value heads copied", dev.get(out).reshape(B, T, -1, hs)[:, :, NH + NKV:],
                         x.reshape(B, T, -1, hs)[:, :, NH + NKV:])


def test_rope_in_place_and_default_kv_heads(dev):
    """out may be inp (the Llama step rotates qkv in place); num_kv_heads=None means NH;
    the backward inverts the forward up to two roundings of values ~3 (1e-5)."""
    k = _kernels()
    B, T, NH, hs = 2, 7, 3, 8
    cos, sin = cpu_rope.rope_frequencies(hs, T, 500000.0)
    x, _ = rand_x(np.random.default_rng(5), FP32, B, T, 3 * NH * hs)
    buf = dev.put(x)
    k.rope_forward(buf, buf, dev.put(cos), dev.put(sin), NH)
    ref = np.empty_like(x)
    cpu_rope.rope_forward(ref, x, cos, sin, NH, NH)
    assert_close("rope in place", dev.get(buf), ref, **ROPE_TOL)
    k.rope_backward(buf, buf, dev.put(cos), dev.put(sin), NH)
    assert_close("rope backward(forward(x)) in place", dev.get(buf), x, 1e-5, 1e-5)


def test_rope_rejects_bad_arguments():
    k = _kernels()
    cos, sin = cpu_rope.rope_frequencies(8, 4)
    q = np.ones((1, 4, 32), np.float32)  # NH=2, NKV=1: (2+2)*8 = 32
    with pytest.raises(ValueError, match=r"rope_forward: cos must have shape \(>= T, hs/2\) = \(>= 4, 4\), got \(4, 3\)"):
        k.rope_forward(np.empty_like(q), q, np.ones((4, 3), np.float32), sin, 2, 1)
    with pytest.raises(TypeError, match=r"rope_forward: cos must have dtype float32, got uint16"):
        k.rope_forward(np.empty(q.shape, np.uint16), q.astype(np.uint16), cos.astype(np.uint16), sin, 2, 1)
    with pytest.raises(ValueError, match=r"rope_backward: dinp must have shape \(1, 4, 32\)"):
        k.rope_backward(np.empty((1, 4, 16), np.float32), q, cos, sin, 2, 1)
