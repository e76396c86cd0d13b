"""The matmul lab (kernels/dev/matmul.cu through kernels/dev/matmul.py): version 1, the
GEMMs on cuBLAS (NumPy under the emulator) with the bias as separate kernels
(matmul_bias_forward_kernel1: out += bias; matmul_bias_backward_kernel1: a thread per
column walking the rows), against the NumPy oracle llmcu/cpu/matmul.py, fp32 and bf16.

Tolerances. fp32: atol = rtol = 1e-5 of the values' scale for the GEMM outputs (sums of
up to 1023 terms in another order), and for the gradients that are start + a sum of N
rows atol = (N + log2 N + 2) * 2^-24 * max(|start| + sum |terms|) (any order, Higham
4.2). bf16: one rounding more (rtol 2^-8); the forward's out is rounded twice (the GEMM,
then + bias), which adds 2^-8 of its scale to atol. dbias also with
accumulate_weight=False (overwritten, the old values ignored) and on its own
(matmul_bias_backward). Outputs NaN-poisoned, gradients start random.
"""

import math

import numpy as np
import pytest

from helpers import Device, KERNEL_BACKENDS, assert_close, rand_x, value
from llmcu.lab import load as load_lab
from llmcu.cpu import matmul as cpu

U, F32, EPS32 = 2.0 ** -8, 1e-5, 2.0 ** -24
DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]


lab = load_lab("matmul")
ops = lab.VERSIONS[1].ops


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def out_tol(dtype, ref, roundings=1):
    scale = float(np.abs(ref).max()) or 1.0
    if np.dtype(dtype) != np.uint16:
        return dict(atol=F32 * scale, rtol=F32)
    return dict(atol=F32 * scale + (roundings - 1) * U * scale, rtol=U + F32)


def sum_tol(dtype, start, terms):
    n = terms.shape[0]
    colsum = np.abs(start).astype(np.float64) + np.abs(terms).astype(np.float64).sum(axis=0)
    return dict(atol=(n + math.log2(max(n, 1)) + 2) * EPS32 * float(colsum.max()),
                rtol=U if np.dtype(dtype) == np.uint16 else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,T,C,OC", [(2, 7, 48, 144), (1, 3, 1023, 37)])
def test_forward1(dev, dtype, bias, B, T, C, OC):
    rng = np.random.default_rng(2)
    (x, xf), (w, wf), (b, bf) = (rand_x(rng, dtype, B, T, C), rand_x(rng, dtype, OC, C, scale=0.1),
                                 rand_x(rng, dtype, OC))
    out = dev.poisoned((B, T, OC), dtype)
    ops["matmul_forward"](out, dev.put(x), dev.put(w), dev.put(b) if bias else None)
    ref = np.empty((B, T, OC), np.float32)
    cpu.matmul_forward(ref, xf, wf, bf if bias else None)
    assert_close("matmul_forward v1 out", value(dev.get(out)), ref, **out_tol(dtype, ref, roundings=2 if bias else 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("B,T,C,OC", [(2, 7, 48, 144), (1, 3, 1023, 37)])
def test_backward1(dev, dtype, accumulate, B, T, C, OC):
    rng = np.random.default_rng(3)
    (x, xf), (w, wf), (dout, doutf) = (rand_x(rng, dtype, B, T, C), rand_x(rng, dtype, OC, C, scale=0.1),
                                       rand_x(rng, dtype, B, T, OC))
    (dw0, dw0f), (db0, db0f) = rand_x(rng, dtype, OC, C), rand_x(rng, dtype, OC)
    dinp, dw, db = dev.poisoned((B, T, C), dtype), dev.put(dw0), dev.put(db0)
    ops["matmul_backward"](dinp, dw, db, dev.put(dout), dev.put(x), dev.put(w), accumulate_weight=accumulate)
    rdinp, rdw, rdb = np.empty((B, T, C), np.float32), dw0f.copy(), db0f.copy()
    cpu.matmul_backward(rdinp, rdw, rdb, doutf, xf, wf, accumulate_weight=accumulate)
    rows, xrows = doutf.reshape(-1, OC), xf.reshape(-1, C)
    start_w, start_b = (dw0f, db0f) if accumulate else (np.zeros_like(dw0f), np.zeros_like(db0f))
    assert_close("matmul_backward v1 dinp", value(dev.get(dinp)), rdinp, **out_tol(dtype, rdinp))
    assert_close("matmul_backward v1 dweight", value(dev.get(dw)), rdw,
                 **sum_tol(dtype, start_w, rows[:, :, None] * xrows[:, None, :]))
    assert_close("matmul_bias_backward_kernel1 dbias", value(dev.get(db)), rdb, **sum_tol(dtype, start_b, rows))


def test_bias_backward_alone(dev):
    """matmul_bias_backward (what matmul_backward calls) on a 3-D dout of GPT-2's width."""
    rng = np.random.default_rng(29)
    (dout, _), (db0, _) = rand_x(rng, np.float32, 2, 9, 768), rand_x(rng, np.float32, 768)
    db = dev.put(db0)
    ops["matmul_bias_backward"](db, dev.put(dout))
    ref = db0 + dout.reshape(-1, 768).sum(axis=0)
    assert_close("matmul_bias_backward v1", dev.get(db), ref, **sum_tol(np.float32, db0, dout.reshape(-1, 768)))
    with pytest.raises(ValueError, match=r"matmul_bias_backward: dbias must have shape \(768,\), got \(5,\)"):
        ops["matmul_bias_backward"](dev.put(np.zeros(5, np.float32)), dev.put(dout))
