"""The bias gradient from the weight-gradient GEMM (cuBLASLt's BGRADB epilogue):
lt_matmul(..., a_row_sums=) and matmul_backward / matmul_dgelu_backward(bias_epilogue=True)
against llmcu's bias-gradient kernels, and GPT2(bias_epilogue=True) against the default.

Under the emulator the epilogue is NumPy's fp32 row sum with one rounding (the tests
check which array is which, and that the kernels no longer run); on a GPU ("cuda",
skipped here) cuBLASLt's own reduction, whose order is its own: the tolerances allow
fp32 order effects (1e-5 of sums of O(sqrt(N)) values) and one bf16 rounding."""

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device, assert_close
from llmcu.config import GPT2Config
from llmcu.cpu.gpt2 import init_parameters
from llmcu.cuda import cublaslt, matmul
from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits

BF16_TOL = dict(atol=2.0 ** -7, rtol=2.0 ** -7)   # one bf16 rounding of each side, + order
FP32_TOL = dict(atol=1e-4, rtol=1e-5)             # sums of up to 33 O(1) values in another order


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def _put(dev, x, dtype):
    return dev.put(float32_to_bf16_bits(x) if dtype == "bf16" else x.astype(np.float32))


def _get(dev, a):
    a = dev.get(a)
    return bf16_bits_to_float32(a) if a.dtype == np.uint16 else a


def _poison(dev, shape, dtype):
    return _put(dev, np.full(shape, np.nan, np.float32), dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("transpose_a", [True, False])
def test_lt_matmul_a_row_sums(dev, dtype, transpose_a):
    """a_row_sums[i] = sum over k of op(a)[i, k], beside the product itself."""
    rng = np.random.default_rng(7)
    M, K, N = 24, 33, 16
    a = rng.standard_normal((K, M) if transpose_a else (M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    if dtype == "bf16":
        a, b = (bf16_bits_to_float32(float32_to_bf16_bits(x)) for x in (a, b))
    out, sums = _poison(dev, (M, N), dtype), _poison(dev, (M,), dtype)
    cublaslt.lt_matmul(out, _put(dev, a, dtype), _put(dev, b, dtype), transpose_a=transpose_a, a_row_sums=sums)
    op_a = a.T if transpose_a else a
    tol = BF16_TOL if dtype == "bf16" else FP32_TOL
    assert_close("a_row_sums", _get(dev, sums), op_a.sum(axis=1), **tol)
    assert_close("product", _get(dev, out), op_a @ b, **tol)


def test_lt_matmul_a_row_sums_rejects_bad_input():
    a, b, out = np.zeros((4, 3), np.float32), np.zeros((3, 2), np.float32), np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"lt_matmul: a_row_sums must have shape \(4,\), got \(3,\)"):
        cublaslt.lt_matmul(out, a, b, a_row_sums=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="lt_matmul: a_row_sums .* takes no bias, gelu_aux or dgelu_aux"):
        cublaslt.lt_matmul(out, a, b, bias=np.zeros(2, np.float32), a_row_sums=np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="lt_matmul: a_row_sums must have dtype float32, got uint16"):
        cublaslt.lt_matmul(out, a, b, a_row_sums=np.zeros(4, np.uint16))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("library", ["cublaslt_all", "cublaslt_all_tuned"])
def test_matmul_backward_bias_epilogue(dev, launches, dtype, library):
    """With bias_epilogue=True and an overwriting backward on a cublaslt_all route, dbias
    comes from the dweight GEMM (no bias kernel runs) and equals the kernels' dbias; an
    accumulating backward (gradient accumulation) still adds with the kernels."""
    rng = np.random.default_rng(3)
    N, C, OC = 33, 40, 24
    inp, w, dout = (rng.standard_normal(s).astype(np.float32) for s in ((N, C), (OC, C), (N, OC)))
    if dtype == "bf16":  # bf16-representable inputs, so the fp32 references see what the kernels see
        inp, w, dout = (bf16_bits_to_float32(float32_to_bf16_bits(x)) for x in (inp, w, dout))
    tol = BF16_TOL if dtype == "bf16" else FP32_TOL
    results = {}
    for fused in (False, True):
        dinp, dw, db = _poison(dev, (N, C), dtype), _poison(dev, (OC, C), dtype), _poison(dev, (OC,), dtype)
        launches.clear()
        matmul.matmul_backward(dinp, dw, db, _put(dev, dout, dtype), _put(dev, inp, dtype), _put(dev, w, dtype),
                               accumulate_weight=False, gemm_library=library, bias_epilogue=fused)
        bias_kernels = [k for k in launches if k.startswith("matmul_bias_backward")]
        assert bool(bias_kernels) is not fused, (fused, launches)
        results[fused] = [_get(dev, x) for x in (dinp, dw, db)]
        if fused:  # a second, accumulating backward: the kernels add onto the epilogue's dbias
            launches.clear()
            matmul.matmul_backward(dinp, dw, db, _put(dev, dout, dtype), _put(dev, inp, dtype),
                                   _put(dev, w, dtype), accumulate_weight=True, gemm_library=library,
                                   bias_epilogue=True)
            assert any(k.startswith("matmul_bias_backward") for k in launches)
            assert_close("accumulated dbias", _get(dev, db), 2 * dout.sum(0), **tol)
    for name, x, y in zip(("dinp", "dweight", "dbias"), results[True], results[False]):
        assert_close(name, x, y, **tol)
    assert_close("dbias vs column sums", results[True][2], dout.sum(0), **tol)


def test_matmul_backward_bias_epilogue_needs_an_lt_all_route(launches):
    """On the cuBLAS route (or cublaslt, whose backward GEMMs are cuBLAS's) bias_epilogue
    changes nothing: the kernels run."""
    rng = np.random.default_rng(4)
    N, C, OC = 9, 16, 8
    inp, w, dout = (rng.standard_normal(s).astype(np.float32) for s in ((N, C), (OC, C), (N, OC)))
    for library in ("cublas", "cublaslt"):
        launches.clear()
        db = np.full(OC, np.nan, np.float32)
        matmul.matmul_backward(None, np.zeros((OC, C), np.float32), db, dout, inp, w, accumulate_weight=False,
                               gemm_library=library, bias_epilogue=True)
        assert any(k.startswith("matmul_bias_backward") for k in launches), library
        assert_close("dbias", db, dout.sum(0), **FP32_TOL)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpt2_bias_epilogue_trains_like_the_kernels(launches, dtype):
    """GPT2(gemm="cublaslt_all", bias_epilogue=True): no bias-gradient kernel in a step of
    one micro-batch; 4 AdamW steps' losses within 1e-5 (fp32) or llm.c's bf16 tolerance 0.05
    of the same model with the kernels."""
    from llmcu.cuda.gpt2 import GPT2
    cfg = GPT2Config(max_seq_len=16, vocab_size=100, num_layers=2, num_heads=2, channels=32)
    p0 = init_parameters(cfg, seed=8)
    toks = np.random.default_rng(9).integers(0, 100, size=(2, 2, 9)).astype(np.int32)
    losses = {}
    for fused in (False, True):
        model = GPT2(cfg, p0.copy(), device="emu", dtype=dtype, gemm="cublaslt_all", bias_epilogue=fused)
        launches.clear()
        losses[fused] = []
        for s in range(4):
            x, y = toks[s % 2, :, :-1], toks[s % 2, :, 1:]
            model.zero_grad()
            losses[fused].append(model.forward(x, y))
            model.backward()
            model.update(1e-2, s + 1)
        assert any(k.startswith("matmul_bias_backward") for k in launches) is not fused
        assert model.sampler().bias_epilogue is fused
    tol = 1e-5 if dtype == "fp32" else 0.05
    np.testing.assert_allclose(losses[True], losses[False], atol=tol, rtol=0)
    with pytest.raises(TypeError, match="GPT2: bias_epilogue must be a bool, got str"):
        GPT2(cfg, device="emu", bias_epilogue="yes")
