"""The layernorm lab (kernels/dev/layernorm.cu through kernels/dev/layernorm.py) against the
NumPy oracle llmcu/cpu/layernorm.py, fp32 and bf16, on the emulator (and a GPU when there
is one): forward version 0 (a thread per row), forward version 2 (a warp per row, 16-byte
loads), backward version 1 (a warp per row for dinp, a thread per column for the
parameter gradients).

Tolerances. fp32: atol = rtol = 1e-5 of the values' scale (each version sums a row in its
own order, ~1e-6 relative from NumPy's pairwise sums at C ~ 1000). bf16: inputs are bf16
values, so the statistics (fp32) keep the fp32 bound and each floatX output is computed
in fp32 and rounded once: rtol = 2^-8 + 1e-5. The parameter gradients are start + a sum
of N row terms: atol = (N + log2 N + 2) * 2^-24 * max(|start| + sum |terms|), a bound on
any summation order (Higham 4.2), plus one bf16 rounding. Outputs are NaN-poisoned;
inputs random, never zeros. Shapes: C = 1023 (not a multiple of 32 or of a packet) for
the scalar versions, 768 (GPT-2), 1024 and one packet (4 or 8) for version 2; T = 7
leaves the last block's warps partly idle.
"""

import math

import numpy as np
import pytest

from helpers import Device, KERNEL_BACKENDS, assert_close, rand_x, value
from llmcu.lab import load as load_lab
from llmcu.cpu import layernorm as cpu

U, F32, EPS32 = 2.0 ** -8, 1e-5, 2.0 ** -24
DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]


lab = load_lab("layernorm")


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def out_tol(dtype, ref):
    scale = float(np.abs(ref).max()) or 1.0
    return dict(atol=F32 * scale, rtol=U + F32 if np.dtype(dtype) == np.uint16 else F32)


def sum_tol(dtype, start, terms):
    """start + the sum over axis 0 of terms (module doc)."""
    n = terms.shape[0]
    colsum = np.abs(start).astype(np.float64) + np.abs(terms).astype(np.float64).sum(axis=0)
    return dict(atol=(n + math.log2(max(n, 1)) + 2) * EPS32 * float(colsum.max()),
                rtol=U if np.dtype(dtype) == np.uint16 else 0.0)


def run_forward(dev, version, dtype, B, T, C, seed=0):
    rng = np.random.default_rng(seed)
    (x, xf), (w, wf), (b, bf) = (rand_x(rng, dtype, B, T, C, scale=3.0, shift=1.0), rand_x(rng, dtype, C),
                                 rand_x(rng, dtype, C))
    out, mean, rstd = dev.poisoned((B, T, C), dtype), dev.poisoned((B, T)), dev.poisoned((B, T))
    lab.VERSIONS[version].ops["layernorm_forward"](out, mean, rstd, dev.put(x), dev.put(w), dev.put(b))
    rout, rmean, rrstd = (np.empty(s, np.float32) for s in ((B, T, C), (B, T), (B, T)))
    cpu.layernorm_forward(rout, rmean, rrstd, xf, wf, bf)
    name = f"layernorm_forward_kernel{version}"
    assert_close(f"{name} mean", dev.get(mean), rmean, atol=F32, rtol=F32)
    assert_close(f"{name} rstd", dev.get(rstd), rrstd, atol=F32, rtol=F32)
    assert_close(f"{name} out", value(dev.get(out)), rout, **out_tol(dtype, rout))
    return value(dev.get(out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C", [(2, 7, 1023), (1, 3, 48)])
def test_forward0(dev, dtype, B, T, C):
    run_forward(dev, 0, dtype, B, T, C)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C", [(2, 7, 768), (1, 3, 1024), (1, 5, 8)])
def test_forward2(dev, dtype, B, T, C):
    run_forward(dev, 2, dtype, B, T, C)


def test_forward_versions_agree_with_the_product(dev):
    """Versions 0 and 2 and the product's kernel1 on one GPT-2-width input, fp32: within the
    fp32 tolerance of each other (three summation orders)."""
    from llmcu.cuda.layernorm import layernorm_forward
    outs = [run_forward(dev, v, np.float32, 2, 9, 768, seed=7) for v in (0, 2)]
    rng = np.random.default_rng(7)
    x, w, b = (rand_x(rng, np.float32, *s, **k)[0] for s, k in (((2, 9, 768), dict(scale=3.0, shift=1.0)),
                                                               ((768,), {}), ((768,), {})))
    out = dev.poisoned((2, 9, 768))
    layernorm_forward(out, dev.poisoned((2, 9)), dev.poisoned((2, 9)), dev.put(x), dev.put(w), dev.put(b))
    assert_close("kernel0 vs product", outs[0], dev.get(out), F32, F32)
    assert_close("kernel2 vs product", outs[1], dev.get(out), F32, F32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C", [(2, 7, 48), (1, 3, 1023), (4, 1, 32)])
def test_backward1(dev, dtype, B, T, C):
    rng = np.random.default_rng(12)
    (x, xf), (w, wf), (dout, doutf) = (rand_x(rng, dtype, B, T, C, scale=3.0, shift=1.0), rand_x(rng, dtype, C),
                                       rand_x(rng, dtype, B, T, C))
    mean, rstd = np.empty((B, T), np.float32), np.empty((B, T), np.float32)
    cpu.layernorm_forward(np.empty((B, T, C), np.float32), mean, rstd, xf, wf, wf)
    (dw0, dw0f), (db0, db0f) = rand_x(rng, dtype, C), rand_x(rng, dtype, C)   # accumulated onto (+=)
    dinp, dw, db = dev.poisoned((B, T, C), dtype), dev.put(dw0), dev.put(db0)
    lab.VERSIONS[1].ops["layernorm_backward"](dinp, dw, db, dev.put(dout), dev.put(x), dev.put(w), dev.put(mean),
                                              dev.put(rstd))
    rdinp, rdw, rdb = np.empty((B, T, C), np.float32), dw0f.copy(), db0f.copy()
    cpu.layernorm_backward(rdinp, rdw, rdb, doutf, xf, wf, mean, rstd)
    rows = doutf.reshape(-1, C)
    norm = ((xf - mean[..., None]) * rstd[..., None]).reshape(-1, C)
    assert_close("layernorm_backward_kernel1 dinp", value(dev.get(dinp)), rdinp, **out_tol(dtype, rdinp))
    assert_close("layernorm_param_backward_kernel1 dweight", value(dev.get(dw)), rdw,
                 **sum_tol(dtype, dw0f, rows * norm))
    assert_close("layernorm_param_backward_kernel1 dbias", value(dev.get(db)), rdb, **sum_tol(dtype, db0f, rows))


def test_forward2_refuses_what_it_cannot_load():
    fwd = lab.VERSIONS[2].ops["layernorm_forward"]
    z = np.zeros((1, 2, 1023), np.float32)
    with pytest.raises(ValueError, match=r"version 2 \(16-byte loads\) needs C % 4 == 0, got C = 1023"):
        fwd(np.empty_like(z), np.empty((1, 2), np.float32), np.empty((1, 2), np.float32), z,
            np.ones(1023, np.float32), np.zeros(1023, np.float32))
    C = 8
    buf = np.zeros(2 * C + 4, np.float32)
    start = (-buf.ctypes.data % 16) // 4 + 1  # a 16-byte boundary, then one float on
    inp = buf[start:start + 2 * C].reshape(2, C)
    with pytest.raises(ValueError, match="version 2 needs inp 16-byte aligned"):
        fwd(np.empty((2, C), np.float32), np.empty(2, np.float32), np.empty(2, np.float32), inp,
            np.ones(C, np.float32), np.zeros(C, np.float32))
    with pytest.raises(ValueError, match=r"layernorm_forward: weight must have shape \(8,\)"):
        fwd(np.empty((2, C), np.float32), np.empty(2, np.float32), np.empty(2, np.float32), np.ones((2, C), np.float32),
            np.ones(9, np.float32), np.zeros(C, np.float32))
