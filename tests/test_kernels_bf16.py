"""Every GPT-2 kernel with floatX = __nv_bfloat16 against the fp32 NumPy oracle,
the 16-byte-load versions in fp32 and bf16, the bf16 GEMM, and AdamW with fp32
master weights and stochastic rounding.

bf16 arrays are uint16 arrays of bf16 bit patterns (llmcu.formats converts,
round to nearest even). Each test draws random fp32 values, rounds them to
bf16, and gives the kernel the bf16 bits and the oracle (llmcu/cpu/, fp32)
the same rounded values widened to fp32, so the only differences left are the
kernel's bf16 roundings plus the fp32 differences test_kernels.py already
allows. Outputs are poisoned with a NaN bf16 pattern (0x7FC0) or fp32 NaN.

Tolerances. bf16 keeps 8 significant bits (7 stored + the implicit one), so
one round-to-nearest of a value y moves it by at most half an ulp,
U * |y| with U = 2^-8 (an ulp of a value in [1, 2) is 2^-7; 2^-9 would need 9
significant bits). A kernel that computes y in fp32 (y' = y up to
the fp32 error of test_kernels.py, atol = rtol = 1e-5 relative to the values'
scale) and rounds once is within |y| (U + 1e-5) + 1e-5 * scale of the oracle:
    rtol = U + 1e-5,   atol = 1e-5 * scale.
Each further rounding of an intermediate of magnitude <= M adds U * M to atol.
Each test names its kernel's number of roundings. Truncating instead of
rounding to nearest (error up to 2U) or a wrong index fails these bounds.
Where the kernel's fp32 arithmetic is the oracle's exactly (a sum of two bf16
values, then one rounding), the comparison is bit for bit.
"""

import math

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device, assert_close
from llmcu.cpu import adamw as cpu_adamw
from llmcu.cpu import classifier as cpu_classifier
from llmcu.cpu import encoder as cpu_encoder
from llmcu.cpu import gelu as cpu_gelu
from llmcu.cpu import layernorm as cpu_layernorm
from llmcu.cpu import matmul as cpu_matmul
from llmcu.formats import bf16_bits_to_float32 as to_f32
from llmcu.formats import float32_to_bf16_bits as to_bits

U = 2.0 ** -8            # bf16 unit roundoff: one rounding is <= U relative
F32 = 1e-5               # fp32 tolerance of test_kernels.py (summation order, libm ulps)
DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def rand_x(rng, dtype, *shape, scale=1.0, shift=0.0):
    """(kernel input in dtype, its exact fp32 value for the oracle)."""
    x = rand(rng, *shape, scale=scale) + np.float32(shift)
    if np.dtype(dtype) == np.uint16:
        bits = to_bits(x)
        return bits, to_f32(bits)
    return x, x


def value(a):
    """fp32 value of a kernel output (bf16 bits widened exactly)."""
    a = np.asarray(a)
    return to_f32(a) if a.dtype == np.uint16 else a


def tol(dtype, ref, roundings=1, intermediate=None):
    """assert_close tolerances for an output of `roundings` bf16 roundings (module doc)."""
    scale = float(np.abs(ref).max()) or 1.0
    if np.dtype(dtype) != np.uint16:
        return dict(atol=F32 * scale, rtol=F32)
    extra = (roundings - 1) * U * (intermediate if intermediate is not None else scale)
    return dict(atol=F32 * scale + extra, rtol=U + F32)


def _mods():
    from llmcu.cuda import adamw, classifier, encoder, gelu, gemm, layernorm, matmul, residual
    return dict(adamw=adamw, classifier=classifier, encoder=encoder, gelu=gelu, gemm=gemm,
                layernorm=layernorm, matmul=matmul, residual=residual)


# ----------------------------------------------------------------------------- encoder

@pytest.mark.parametrize("B,T,C,V", [(2, 7, 48, 101), (1, 5, 1023, 37)])
def test_encoder_bf16(dev, B, T, C, V):
    k = _mods()["encoder"]
    rng = np.random.default_rng(10)
    Vp, maxT = V + 3, T + 2
    inp = rng.integers(0, V, (B, T)).astype(np.int32)
    inp[0, :3] = 1  # a repeated id: the backward must sum it
    (wte, wte_f), (wpe, wpe_f), (dout, dout_f) = (rand_x(rng, np.uint16, *s) for s in
                                                   ((Vp, C), (maxT, C), (B, T, C)))
    out = dev.poisoned((B, T, C), np.uint16)
    k.encoder_forward(out, dev.put(inp), dev.put(wte), dev.put(wpe))
    ref = np.empty((B, T, C), np.float32)
    cpu_encoder.encoder_forward(ref, inp, wte_f, wpe_f)
    # One fp32 add of two bf16 values (as the oracle's), one rounding: bit for bit.
    np.testing.assert_array_equal(dev.get(out), to_bits(ref), err_msg="encoder out (bf16 bits)")

    (w0, w0_f), (p0, p0_f) = rand_x(rng, np.uint16, Vp, C), rand_x(rng, np.uint16, maxT, C)
    dwte, dwpe = dev.put(w0), dev.put(p0)
    k.encoder_backward(dwte, dwpe, dev.put(dout), dev.put(inp))
    rwte, rwpe = w0_f.copy(), p0_f.copy()
    cpu_encoder.encoder_backward(rwte, rwpe, dout_f, inp)
    # dwte: a token seen n times is rounded after each of its n additions; every
    # partial sum is at most |start| + sum |dout| <= (n + 1) max|value|.
    n = int(np.bincount(inp.reshape(-1)).max())
    big = float(max(np.abs(w0_f).max(), np.abs(dout_f).max()))
    assert_close("encoder dwte", value(dev.get(dwte)), rwte,
                 **tol(np.uint16, rwte, roundings=n, intermediate=(n + 1) * big))
    # dwpe: the sum over b in fp32, one rounding.
    assert_close("encoder dwpe", value(dev.get(dwpe)), rwpe, **tol(np.uint16, rwpe))


# --------------------------------------------------------------------------- layernorm

@pytest.mark.parametrize("version,B,T,C", [(0, 2, 7, 48), (1, 2, 7, 48), (1, 1, 3, 1023),
                                           (2, 2, 7, 768), (2, 1, 5, 8)])
def test_layernorm_forward_bf16(dev, version, B, T, C):
    k = _mods()["layernorm"]
    rng = np.random.default_rng(11)
    (x, x_f), (w, w_f), (b, b_f) = (rand_x(rng, np.uint16, *B_T_C, scale=s) for B_T_C, s in
                                    (((B, T, C), 3.0), ((C,), 1.0), ((C,), 1.0)))
    out, mean, rstd = dev.poisoned((B, T, C), np.uint16), dev.poisoned((B, T)), dev.poisoned((B, T))
    k.layernorm_forward(out, mean, rstd, dev.put(x), dev.put(w), dev.put(b), version=version)
    rout, rmean, rrstd = (np.empty(s, np.float32) for s in ((B, T, C), (B, T), (B, T)))
    cpu_layernorm.layernorm_forward(rout, rmean, rrstd, x_f, w_f, b_f)
    # Statistics are fp32 sums of exact bf16 values: test_kernels.py's fp32 tolerance.
    assert_close(f"layernorm v{version} mean", dev.get(mean), rmean, atol=F32, rtol=F32)
    assert_close(f"layernorm v{version} rstd", dev.get(rstd), rrstd, atol=F32, rtol=F32)
    # out: computed in fp32, one rounding.
    assert_close(f"layernorm v{version} out", value(dev.get(out)), rout, **tol(np.uint16, rout))


@pytest.mark.parametrize("B,T,C", [(2, 7, 48), (1, 3, 1023)])
def test_layernorm_backward_bf16(dev, B, T, C):
    k = _mods()["layernorm"]
    rng = np.random.default_rng(12)
    x = to_bits(rand(rng, B, T, C, scale=3.0) + 1.0)
    x_f = to_f32(x)
    (w, w_f), (dout, dout_f) = rand_x(rng, np.uint16, C), rand_x(rng, np.uint16, B, T, C)
    mean = np.empty((B, T), np.float32)
    rstd = np.empty((B, T), np.float32)
    cpu_layernorm.layernorm_forward(np.empty((B, T, C), np.float32), mean, rstd, x_f, w_f, w_f)
    (dw0, dw0_f), (db0, db0_f) = rand_x(rng, np.uint16, C), rand_x(rng, np.uint16, C)
    dinp, dw, db = dev.poisoned((B, T, C), np.uint16), dev.put(dw0), dev.put(db0)
    k.layernorm_backward(dinp, dw, db, dev.put(dout), dev.put(x), dev.put(w), dev.put(mean),
                         dev.put(rstd))
    rdinp, rdw, rdb = np.empty((B, T, C), np.float32), dw0_f.copy(), db0_f.copy()
    cpu_layernorm.layernorm_backward(rdinp, rdw, rdb, dout_f, x_f, w_f, mean, rstd)
    # Each output: fp32 reductions, then one rounding (dweight/dbias: start + sum, rounded once).
    assert_close("layernorm dinp", value(dev.get(dinp)), rdinp, **tol(np.uint16, rdinp))
    assert_close("layernorm dweight", value(dev.get(dw)), rdw, **tol(np.uint16, rdw))
    assert_close("layernorm dbias", value(dev.get(db)), rdb, **tol(np.uint16, rdb))


# ------------------------------------------------------------------------- GEMM, matmul

@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (False, True), (True, False),
                                                     (True, True)])
def test_gemm_bf16(dev, transpose_a, transpose_b):
    g = _mods()["gemm"]
    rng = np.random.default_rng(13)
    M, K, N = 7, 33, 5
    (a, a_f) = rand_x(rng, np.uint16, *((K, M) if transpose_a else (M, K)))
    (b, b_f) = rand_x(rng, np.uint16, *((N, K) if transpose_b else (K, N)))
    ref = (a_f.T if transpose_a else a_f) @ (b_f.T if transpose_b else b_f)
    out = dev.poisoned((M, N), np.uint16)
    g.gemm(out, dev.put(a), dev.put(b), transpose_a=transpose_a, transpose_b=transpose_b)
    # fp32 products and sums, one rounding on output.
    assert_close("gemm out", value(dev.get(out)), ref, **tol(np.uint16, ref))

    c0, c0_f = rand_x(rng, np.uint16, M, N)
    acc = dev.put(c0)
    g.gemm(acc, dev.put(a), dev.put(b), transpose_a=transpose_a, transpose_b=transpose_b,
           accumulate=True)
    # The old value is added in fp32 before the one rounding (cuBLAS's beta = 1).
    assert_close("gemm accumulate", value(dev.get(acc)), c0_f + ref, **tol(np.uint16, c0_f + ref))


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, True), (True, False)])
def test_gemm_strided_batched_bf16(dev, transpose_a, transpose_b):
    g = _mods()["gemm"]
    rng = np.random.default_rng(14)
    Bt, M, K, N = 3, 6, 17, 9
    a, a_f = rand_x(rng, np.uint16, Bt, *((K, M) if transpose_a else (M, K)))
    b, b_f = rand_x(rng, np.uint16, Bt, *((N, K) if transpose_b else (K, N)))
    ref = np.matmul(a_f.swapaxes(1, 2) if transpose_a else a_f, b_f.swapaxes(1, 2) if transpose_b else b_f)
    out = dev.poisoned((Bt, M, N), np.uint16)
    g.gemm_strided_batched(out, dev.put(a), dev.put(b), transpose_a=transpose_a, transpose_b=transpose_b)
    assert_close("gemm batched out", value(dev.get(out)), ref, **tol(np.uint16, ref))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,T,C,OC", [(2, 7, 48, 144), (1, 3, 1023, 37)])
def test_matmul_bf16(dev, B, T, C, OC, bias):
    k = _mods()["matmul"]
    rng = np.random.default_rng(15)
    (x, x_f), (w, w_f), (dout, dout_f) = (rand_x(rng, np.uint16, *s, scale=sc) for s, sc in
                                           (((B, T, C), 1.0), ((OC, C), 0.1), ((B, T, OC), 1.0)))
    bvec, bvec_f = rand_x(rng, np.uint16, OC)
    out = dev.poisoned((B, T, OC), np.uint16)
    k.matmul_forward(out, dev.put(x), dev.put(w), dev.put(bvec) if bias else None)
    ref = np.empty((B, T, OC), np.float32)
    cpu_matmul.matmul_forward(ref, x_f, w_f, bvec_f if bias else None)
    # GEMM rounded, then + bias rounded: two roundings with bias, the first of x @ w.T.
    product = float(np.abs(x_f.reshape(-1, C) @ w_f.T).max())
    assert_close("matmul out", value(dev.get(out)), ref,
                 **tol(np.uint16, ref, roundings=2 if bias else 1, intermediate=product))

    (dw0, dw0_f), (db0, db0_f) = rand_x(rng, np.uint16, OC, C), rand_x(rng, np.uint16, OC)
    dinp, dw = dev.poisoned((B, T, C), np.uint16), dev.put(dw0)
    db = dev.put(db0) if bias else None
    k.matmul_backward(dinp, dw, db, dev.put(dout), dev.put(x), dev.put(w))
    rdinp, rdw, rdb = np.empty((B, T, C), np.float32), dw0_f.copy(), db0_f.copy() if bias else None
    cpu_matmul.matmul_backward(rdinp, rdw, rdb, dout_f, x_f, w_f)
    # One rounding each: dinp the GEMM; dweight old + GEMM in fp32; dbias old + column sum.
    assert_close("matmul dinp", value(dev.get(dinp)), rdinp, **tol(np.uint16, rdinp))
    assert_close("matmul dweight", value(dev.get(dw)), rdw, **tol(np.uint16, rdw))
    if bias:
        assert_close("matmul dbias", value(dev.get(db)), rdb, **tol(np.uint16, rdb))


# ----------------------------------------------------------------- gelu and residual

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version,shape", [(1, (2, 7, 192)), (1, (3, 1023)), (2, (2, 7, 192)),
                                           (2, (1, 8))])
def test_gelu_versions(dev, dtype, version, shape):
    k = _mods()["gelu"]
    rng = np.random.default_rng(16)
    (x, x_f), (dout, dout_f) = rand_x(rng, dtype, *shape, scale=2.0), rand_x(rng, dtype, *shape)
    out, dinp = dev.poisoned(shape, dtype), dev.poisoned(shape, dtype)
    k.gelu_forward(out, dev.put(x), version=version)
    k.gelu_backward(dinp, dev.put(dout), dev.put(x), version=version)
    rout, rdinp = np.empty(shape, np.float32), np.empty(shape, np.float32)
    cpu_gelu.gelu_forward(rout, x_f)
    cpu_gelu.gelu_backward(rdinp, dout_f, x_f)
    # fp32 math (tanhf within a few ulp of NumPy's), one rounding per output.
    assert_close(f"gelu v{version} out", value(dev.get(out)), rout, **tol(dtype, rout))
    assert_close(f"gelu v{version} dinp", value(dev.get(dinp)), rdinp, **tol(dtype, rdinp))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version,shape", [(1, (3, 7, 33)), (2, (3, 7, 32)), (2, (1, 8))])
def test_residual_versions(dev, dtype, version, shape):
    k = _mods()["residual"]
    rng = np.random.default_rng(17)
    (a, a_f), (b, b_f) = rand_x(rng, dtype, *shape), rand_x(rng, dtype, *shape)
    # The fp32 sum of two fp32/bf16 values, rounded once to dtype, as NumPy does: bit for bit.
    want = (a_f + b_f) if np.dtype(dtype) == np.float32 else to_bits(a_f + b_f)
    out = dev.poisoned(shape, dtype)
    k.residual_forward(out, dev.put(a), dev.put(b), version=version)
    np.testing.assert_array_equal(dev.get(out), want, err_msg=f"residual v{version} out")
    acc = dev.put(a)
    k.residual_forward(acc, acc, dev.put(b), version=version)  # out aliases inp1
    np.testing.assert_array_equal(dev.get(acc), want, err_msg=f"residual v{version} in place")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,V", [(2, 7, 64, 101), (1, 3, 8, 17)])
def test_encoder_forward_version2(dev, dtype, B, T, C, V):
    k = _mods()["encoder"]
    rng = np.random.default_rng(23)
    Vp, maxT = V + 3, T + 2
    inp = rng.integers(0, V, (B, T)).astype(np.int32)
    (wte, wte_f), (wpe, wpe_f) = rand_x(rng, dtype, Vp, C), rand_x(rng, dtype, maxT, C)
    out = dev.poisoned((B, T, C), dtype)
    k.encoder_forward(out, dev.put(inp), dev.put(wte), dev.put(wpe), version=2)
    ref = np.empty((B, T, C), np.float32)
    cpu_encoder.encoder_forward(ref, inp, wte_f, wpe_f)
    # one fp32 add, one rounding to dtype, as NumPy: bit for bit
    want = ref if np.dtype(dtype) == np.float32 else to_bits(ref)
    np.testing.assert_array_equal(dev.get(out), want, err_msg="encoder_forward_kernel2 out")


def test_vectorized_versions_check_size_and_alignment():
    from llmcu.cuda import gelu, residual
    x = to_bits(np.ones(12, np.float32))  # 12 bf16: not whole 8-element packets
    with pytest.raises(ValueError, match=r"gelu_forward: the 16-byte-load version needs a multiple "
                                         r"of 8 elements \(uint16\), got 12"):
        gelu.gelu_forward(np.empty_like(x), x, version=2)
    buf = np.zeros(20, np.float32)
    off = buf[1:17]  # 4 bytes past a (16-byte aligned) allocation: misaligned
    if off.ctypes.data % 16 == 0:
        off = buf[2:18]
    with pytest.raises(ValueError, match=r"residual_forward: the 16-byte-load version needs inp1 16-byte aligned"):
        residual.residual_forward(np.zeros(16, np.float32), off, np.zeros(16, np.float32), version=2)
    from llmcu.cuda import encoder
    with pytest.raises(ValueError, match=r"encoder_forward: the 16-byte-load version needs a multiple "
                                         r"of 4 channels \(C\) \(float32\), got 6"):
        encoder.encoder_forward(np.zeros((1, 2, 6), np.float32), np.zeros((1, 2), np.int32),
                                np.zeros((3, 6), np.float32), np.zeros((2, 6), np.float32), version=2)
    with pytest.raises(ValueError, match=r"gelu_forward: version must be one of \(1, 2\) or 'auto', got 3"):
        gelu.gelu_forward(np.empty_like(x), x, version=3)


# ---------------------------------------------------------------------- classifier

@pytest.mark.parametrize("B,T,V,Vp", [(2, 7, 1000, 1024), (1, 3, 101, 128)])
@pytest.mark.parametrize("version", [1, 2, 3])  # 2: online softmax, 16-byte loads; 3: row in registers
def test_classifier_bf16(dev, B, T, V, Vp, version):
    k = _mods()["classifier"]
    rng = np.random.default_rng(18)
    logits, logits_f = rand_x(rng, np.uint16, B, T, Vp, scale=3.0)
    logits[..., V:] = to_bits(np.float32(1e4))  # padded columns must be ignored however large
    logits_f = to_f32(logits)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    probs, losses = dev.poisoned((B, T, Vp)), dev.poisoned((B, T))
    k.softmax_forward(probs, dev.put(logits), V)
    k.crossentropy_forward(losses, dev.put(logits), dev.put(targets), V, version=version)
    rprobs, rlosses = np.empty_like(logits_f), np.empty((B, T), np.float32)
    cpu_classifier.softmax_forward(rprobs, logits_f, V)
    cpu_classifier.crossentropy_forward(rlosses, logits_f, targets, V)
    # probs and losses are fp32 outputs computed from exact bf16 inputs: fp32 tolerance
    # (probs ~1e-3: absolute 1e-7, as in test_kernels.py).
    assert_close("softmax probs (bf16 logits)", dev.get(probs), rprobs, atol=1e-7, rtol=F32)
    assert_close("crossentropy losses (bf16 logits)", dev.get(losses), rlosses, **tol(np.float32, rlosses))

    dloss = 1.0 / (B * T)
    dlogits, losses2 = dev.put(logits), dev.poisoned((B, T))
    k.fused_classifier_dlogits(dlogits, losses2, dev.put(targets), V, dloss, version=version)
    rdlogits, rlosses2 = logits_f.copy(), np.empty((B, T), np.float32)
    cpu_classifier.fused_classifier_dlogits(rdlogits, rlosses2, targets, V, dloss)
    assert_close("fused losses (bf16)", dev.get(losses2), rlosses2, **tol(np.float32, rlosses2))
    # dlogits: fp32 softmax, one rounding; absolute 1e-7 * dloss-scale as in the fp32 test.
    assert_close("fused dlogits (bf16)", value(dev.get(dlogits)), rdlogits, atol=1e-7, rtol=U + F32)
    assert not np.any(value(dev.get(dlogits))[..., V:]), "padded columns of dlogits must be exactly 0"


# ------------------------------------------------------------------ global norm

@pytest.mark.parametrize("n", [1, 1000, 70001])
def test_global_norm_bf16(dev, n):
    k = _mods()["adamw"]
    g, g_f = rand_x(np.random.default_rng(19), np.uint16, n)
    got = k.global_norm(dev.put(g))
    want = math.sqrt(float(np.sum(g_f.astype(np.float64) ** 2)))
    # exact bf16 inputs, fp32 squares and sums: fp32 tolerance
    assert abs(got - want) <= F32 * want, (got, want)


# ----------------------------------------------------- AdamW, master weights, stochastic rounding

ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)


def _bf16_neighbours(x):
    """The bf16 bit patterns just below and above |x| (equal when x is a bf16 value)."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    low = (bits >> 16).astype(np.uint16)
    exact = (bits & 0xFFFF) == 0
    return low, np.where(exact, low, low + 1).astype(np.uint16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37)])
def test_adamw_master_weights(dev, dtype, weight_decay, grad_scale):
    """The fp32 master copy follows the fp32 oracle; the floatX copy is one of the
    two floatX neighbours of the master value (fp32: the master value itself)."""
    k = _mods()["adamw"]
    rng = np.random.default_rng(20)
    n = 5003
    master = rand(rng, n)
    g, g_f = rand_x(rng, dtype, n)
    m, v = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))
    params = to_bits(master) if np.dtype(dtype) == np.uint16 else master.copy()
    dp, dmaster, dg, dm, dv = (dev.put(a) for a in (params, master, g, m, v))
    for step in (1, 2, 3):
        k.adamw_update(dp, dg, dm, dv, step, weight_decay=weight_decay, grad_scale=grad_scale,
                       master_params=dmaster, seed=1234 + step, **ADAM)
        cpu_adamw.adamw_update(master, g_f, m, v, step, weight_decay=weight_decay,
                               grad_scale=grad_scale, **ADAM)
    # Same arithmetic as adamw_kernel1 on fp32: the fp32 tolerances of test_kernels.py.
    assert_close("adamw master", dev.get(dmaster), master, atol=1e-6, rtol=1e-6)
    assert_close("adamw m", dev.get(dm), m, atol=1e-7, rtol=1e-6)
    assert_close("adamw v", dev.get(dv), v, atol=1e-7, rtol=1e-6)
    got_master, got = dev.get(dmaster), dev.get(dp)
    if np.dtype(dtype) == np.float32:
        np.testing.assert_array_equal(got, got_master, err_msg="fp32 params == master")
        return
    low, high = _bf16_neighbours(got_master)
    off = (got != low) & (got != high)
    assert not off.any(), (f"{int(off.sum())} bf16 params are not a neighbour of their master value, "
                           f"e.g. index {int(np.argmax(off))}: {got[off][:3]} not in "
                           f"{low[off][:3]}/{high[off][:3]}")
    # Both neighbours occur (rounding is stochastic, not always down or up).
    inexact = low != high
    assert (got[inexact] == low[inexact]).any() and (got[inexact] == high[inexact]).any()


def test_adamw_stochastic_rounding_is_unbiased(dev):
    """Over S seeds, each element rounds up with frequency close to its fraction
    p = (x - low) / (high - low); a rounding to nearest would be off by up to 1/2.

    Bound: per element, the up-frequency over S independent seeds deviates from
    p by more than t with probability <= 2 exp(-2 S t^2) (Hoeffding); with
    S = 256 and n = 2048 elements, t = 0.22 gives a union bound of
    2 n exp(-2 S t^2) < 1e-6 for a correct kernel to fail. The mean signed
    error over all n*S roundings, in ulps, has standard deviation
    <= 1 / (2 sqrt(n S)); it must be within 5 of those (false failure < 1e-6)."""
    k = _mods()["adamw"]
    rng = np.random.default_rng(21)
    n, S = 2048, 256
    master0 = rand(rng, n)
    g = to_bits(rand(rng, n))
    m0, v0 = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))
    ups = np.zeros(n)
    x = None
    for seed in range(S):
        dp, dmaster, dm, dv = (dev.put(a) for a in (to_bits(master0), master0, m0, v0))
        k.adamw_update(dp, dev.put(g), dm, dv, 1, master_params=dmaster, seed=seed * 7919 + 1, **ADAM)
        got = dev.get(dp)
        if x is None:
            x = dev.get(dmaster)
            low, high = _bf16_neighbours(x)
        ups += got == high
    inexact = low != high
    lo_f, hi_f = to_f32(low).astype(np.float64), to_f32(high).astype(np.float64)
    p = np.where(inexact, (np.abs(x) - np.abs(lo_f)) / np.where(inexact, np.abs(hi_f) - np.abs(lo_f), 1), 0)
    freq = ups / S
    dev_max = float(np.abs(freq - p)[inexact].max())
    assert dev_max <= 0.22, f"an element rounds up with frequency {dev_max:.3f} away from its fraction"
    bias = float(np.mean((freq - p)[inexact]))
    sigma = 1.0 / (2.0 * math.sqrt(int(inexact.sum()) * S))
    assert abs(bias) <= 5 * sigma, f"mean rounding error {bias:.2e} ulp, 5 sigma = {5 * sigma:.2e}"


def test_adamw_bf16_without_master_weights(dev):
    """bf16 params updated in place: each result is within one bf16 ulp of the
    fp32 oracle's update of the same bf16 values (a bf16 neighbour of it), and
    updates ten times smaller than an ulp still move the parameters on
    average by the requested amount (rounding to nearest would drop them all)."""
    k = _mods()["adamw"]
    rng = np.random.default_rng(22)
    n = 20000
    p0 = to_bits(rand(rng, n) * 0.25 + 1.0)  # values in [~0.5, ~2): ulp 2^-8 or 2^-7
    p0_f = to_f32(p0)
    g = to_bits(rand(rng, n))
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    lr = 2.0 ** -7 / 10  # step 1 of Adam moves each param by ~lr: 1/10 to 1/5 of its ulp
    dp = dev.put(p0)
    k.adamw_update(dp, dev.put(g), dev.put(m), dev.put(v), 1, lr, 0.9, 0.95, 1e-8, seed=99)
    ref = p0_f.copy()
    cpu_adamw.adamw_update(ref, to_f32(g), m, v, 1, lr, 0.9, 0.95, 1e-8)
    got = value(dev.get(dp)).astype(np.float64)
    ulp = np.abs(to_f32(_bf16_neighbours(ref)[1]).astype(np.float64) - to_f32(_bf16_neighbours(ref)[0]))
    ulp = np.where(ulp == 0, 2.0 ** (np.floor(np.log2(np.abs(ref))) - 7), ulp)
    # within one ulp (plus the oracle's fp32 difference from the kernel, ~1e-7 relative)
    assert np.all(np.abs(got - ref) <= ulp * (1 + 1e-3)), "a bf16 param is not a neighbour of its update"
    moved = got - p0_f
    assert np.count_nonzero(moved) > 0.02 * n, "sub-ulp updates were all rounded away"
    # mean applied update == mean requested update: each rounding has std <= ulp/2
    requested = ref.astype(np.float64) - p0_f
    sigma = float(np.sqrt(np.sum((ulp / 2) ** 2))) / n
    assert abs(float(np.mean(moved - requested))) <= 5 * sigma


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_master", [True, False])
def test_adamw_version3_equals_version2(dev, dtype, with_master):
    """The 16-byte-load AdamW does kernel2's arithmetic with kernel2's random
    bits element for element: bit-identical params, master weights and moments."""
    k = _mods()["adamw"]
    rng = np.random.default_rng(24)
    n = 8 * 517  # whole packets for fp32 (4) and bf16 (8), not a multiple of the block
    master = rand(rng, n)
    g, _ = rand_x(rng, dtype, n)
    m, v = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))
    params = to_bits(master) if np.dtype(dtype) == np.uint16 else master.copy()
    results = []
    for version in (2, 3):
        arrays = [dev.put(a) for a in (params, master, g, m, v)]
        dp, dmaster, dg, dm, dv = arrays
        for step in (1, 2):
            k.adamw_update(dp, dg, dm, dv, step, weight_decay=0.1, grad_scale=0.5,
                           master_params=dmaster if with_master else None, seed=77 + step,
                           version=version, **ADAM)
        results.append([dev.get(a) for a in (dp, dmaster, dm, dv)])
    for name, a2, a3 in zip(("params", "master", "m", "v"), *results):
        np.testing.assert_array_equal(a3, a2, err_msg=f"adamw_kernel3 {name} != adamw_kernel2")
    # and the update did something (the master copy is untouched without master weights)
    assert not np.array_equal(results[0][0], params)


def test_adamw_arguments():
    from llmcu.cuda.adamw import adamw_update
    p = to_bits(np.ones(4, np.float32))
    z = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"adamw_update: grads must have dtype uint16, got float32"):
        adamw_update(p, z, z.copy(), z.copy(), 1, 1e-3)
    with pytest.raises(TypeError, match=r"adamw_update: m must have dtype float32, got uint16"):
        adamw_update(p, p.copy(), p.copy(), z.copy(), 1, 1e-3)
    with pytest.raises(TypeError, match=r"adamw_update: master_params must have dtype float32, got uint16"):
        adamw_update(p, p.copy(), z.copy(), z.copy(), 1, 1e-3, master_params=p.copy())
    with pytest.raises(ValueError, match=r"adamw_update: seed must be a 32-bit unsigned integer, got -1"):
        adamw_update(p, p.copy(), z.copy(), z.copy(), 1, 1e-3, seed=-1)
    with pytest.raises(ValueError, match=r"adamw_update: version 1 is fp32 without master weights"):
        adamw_update(p, p.copy(), z.copy(), z.copy(), 1, 1e-3, version=1)
    with pytest.raises(ValueError, match=r"adamw_update: the 16-byte-load version needs a multiple "
                                         r"of 8 elements \(uint16\), got 4"):
        adamw_update(p, p.copy(), z.copy(), z.copy(), 1, 1e-3, version=3)


def test_wrappers_reject_mixed_floatx():
    from llmcu.cuda import gelu, layernorm, matmul
    x = to_bits(np.ones((2, 8), np.float32))
    with pytest.raises(TypeError, match=r"gelu_forward: out must have dtype uint16, got float32"):
        gelu.gelu_forward(np.ones((2, 8), np.float32), x)
    with pytest.raises(TypeError, match=r"gelu_forward: inp must have dtype float32 \(fp32\) or "
                                        r"uint16 \(bf16 bit patterns\), got float64"):
        gelu.gelu_forward(np.ones((2, 8)), np.ones((2, 8)))
    w = to_bits(np.ones(8, np.float32))
    with pytest.raises(TypeError, match=r"layernorm_forward: mean must have dtype float32, got uint16"):
        layernorm.layernorm_forward(x.copy(), to_bits(np.ones(2, np.float32)), np.ones(2, np.float32),
                                    x, w, w)
    with pytest.raises(TypeError, match=r"matmul_forward: weight must have dtype uint16, got float32"):
        matmul.matmul_forward(to_bits(np.ones((2, 3), np.float32)), x, np.ones((3, 8), np.float32))


# ------------------------------------------------------- nvcc, bf16 build of every file here

MY_KERNELS = ["adamw", "classifier", "encoder", "gelu", "global_norm", "layernorm", "matmul",
              "residual"]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("stem", MY_KERNELS)
def test_kernel_compiles_bf16(stem, arch, tmp_path):
    """tests/test_kernels_compile.py builds every file with floatX = float; this
    builds the kernel files used for bf16 training with the wrapper's bf16
    options (llmcu.cuda.runtime.compile_options), warning-free."""
    import subprocess

    from llmcu.cuda.runtime import compile_options, kernels_dir
    from test_kernels_compile import find_nvcc
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: install the CUDA toolkit to compile-check the bf16 kernels")
    src = kernels_dir() / f"{stem}.cu"
    cmd = [nvcc, f"-arch={arch}", *compile_options("__nv_bfloat16"), "-I", str(kernels_dir()),
           "-cubin", "-o", str(tmp_path / f"{stem}.cubin"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}"
    assert "warning" not in out.lower(), f"{src.name} (bf16) compiles with warnings:\n{out}"
