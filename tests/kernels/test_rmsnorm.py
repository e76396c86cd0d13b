"""RMSNorm's product kernels (kernels/rmsnorm.cu, llmcu/cuda/rmsnorm.py) against the NumPy
oracle (llmcu/cpu/rmsnorm.py), fp32 and bf16: rmsnorm_forward_kernel1 (one warp per row),
rmsnorm_backward_kernel1 (dinp, one warp per row) and rmsnorm_param_backward_kernel1
(dweight, one thread per column). weight_offset 0 is Llama's scale by w, 1 Gemma's by
1 + w. Inputs are random, outputs NaN-poisoned, dweight starts random (+=).

Tolerances (tests/helpers.py): fp32 within F32 = 1e-5 of the values' scale (the kernel
sums C squares in 32 strided partial sums and a butterfly, NumPy pairwise: ~u sqrt(C)
relative on the statistic; outputs up to ~10, so a missing term, O(1e-2), fails); bf16
outputs computed in fp32 and rounded once (dweight: start + an fp32 sum, rounded once):
out_tol. rstd is an fp32 statistic of exact inputs in both dtypes (F32).
"""

import numpy as np
import pytest

from helpers import BF16, F32, FP32, assert_close, out_tol, rand_x, value
from llmcu.cpu import rmsnorm as cpu_rmsnorm


def _kernels():
    from llmcu.cuda import rmsnorm
    return rmsnorm


# (dtype, B, T, C, weight_offset): C = 1023 (odd), 130 over B*T = 36 rows (several blocks of
# 8 warps); one bf16 case. Tolerances: out_tol of the dtype, F32 for rstd.
@pytest.mark.parametrize("dtype,B,T,C,offset", [
    pytest.param(FP32, 1, 7, 1023, 0.0, id="fp32-llama-C1023"),
    pytest.param(FP32, 4, 9, 130, 1.0, id="fp32-gemma"),
    pytest.param(BF16, 2, 7, 1023, 1.0, id="bf16-gemma-C1023"),
])
def test_rmsnorm(dev, dtype, B, T, C, offset):
    k = _kernels()
    rng = np.random.default_rng(C + int(offset))
    eps = 1e-6 if offset else 1e-5
    (x, x_f), (w, w_f), (dout, dout_f), (dw0, dw0_f) = (
        rand_x(rng, dtype, B, T, C, scale=3.0, shift=0.5), rand_x(rng, dtype, C, scale=0.5, shift=1.0 - offset),
        rand_x(rng, dtype, B, T, C), rand_x(rng, dtype, C))
    out, rstd = dev.poisoned((B, T, C), dtype), dev.poisoned((B, T))
    k.rmsnorm_forward(out, rstd, dev.put(x), dev.put(w), eps=eps, weight_offset=offset)
    rout, rrstd = np.empty((B, T, C), np.float32), np.empty((B, T), np.float32)
    cpu_rmsnorm.rmsnorm_forward(rout, rrstd, x_f, w_f, eps=eps, weight_offset=offset)
    assert_close("rmsnorm rstd", dev.get(rstd), rrstd, atol=F32 * float(np.abs(rrstd).max()), rtol=F32)
    assert_close("rmsnorm out", value(dev.get(out)), rout, **out_tol(dtype, rout))

    dinp, dw = dev.poisoned((B, T, C), dtype), dev.put(dw0)
    k.rmsnorm_backward(dinp, dw, dev.put(dout), dev.put(x), dev.put(w), dev.put(rrstd), weight_offset=offset)
    rdinp, rdw = np.empty((B, T, C), np.float32), dw0_f.copy()
    cpu_rmsnorm.rmsnorm_backward(rdinp, rdw, dout_f, x_f, w_f, rrstd, weight_offset=offset)
    assert_close("rmsnorm dinp", value(dev.get(dinp)), rdinp, **out_tol(dtype, rdinp))
    assert_close("rmsnorm dweight", value(dev.get(dw)), rdw, **out_tol(dtype, rdw))


def test_rmsnorm_rejects_bad_arguments():
    k = _kernels()
    x, w, r = np.ones((2, 3, 4), np.float32), np.ones(4, np.float32), np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"rmsnorm_forward: weight must have shape \(4,\), got \(5,\)"):
        k.rmsnorm_forward(np.empty_like(x), r, x, np.ones(5, np.float32))
    with pytest.raises(TypeError, match=r"rmsnorm_forward: rstd must have dtype float32, got uint16"):
        k.rmsnorm_forward(np.empty(x.shape, np.uint16), r.astype(np.uint16), x.astype(np.uint16), w.astype(np.uint16))
    with pytest.raises(ValueError, match=r"rmsnorm_backward: rstd must have shape \(2, 3\), got \(6,\)"):
        k.rmsnorm_backward(np.empty_like(x), np.zeros(4, np.float32), x, x, w, np.ones(6, np.float32))
