"""lt_matmul, the cuBLASLt GEMM with epilogues (llmcu/cuda/cublaslt.py) behind matmul_forward,
matmul_gelu_forward and matmul_dgelu_backward (whose results tests/kernels/test_matmul.py
checks against the oracle): the row-major -> column-major mapping for every transpose pair,
the argument checks, and the ctypes descriptors. On the emulator lt_matmul is NumPy with
the GPU's arithmetic; the "cuda" cases run libcublasLt itself, the tests of the binding.

Tolerance: fp32, sums of K = 13 products of O(1) values in another order: 1e-5 absolute
and relative (tests/helpers.py's F32).
"""

import numpy as np
import pytest

from helpers import F32, FP32, assert_close, rand_x


def _lt():
    from llmcu.cuda import cublaslt
    return cublaslt


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True), (True, True)])
def test_lt_matmul_transposes(dev, transpose_a, transpose_b):
    """out = op(a) @ op(b) + bias (the BIAS epilogue), fp32, M, K, N = 9, 13, 16."""
    M, K, N = 9, 13, 16
    rng = np.random.default_rng(4)
    a, _ = rand_x(rng, FP32, *((K, M) if transpose_a else (M, K)))
    b, _ = rand_x(rng, FP32, *((N, K) if transpose_b else (K, N)))
    bias, _ = rand_x(rng, FP32, N)
    out = dev.poisoned((M, N))
    _lt().lt_matmul(out, dev.put(a), dev.put(b), transpose_a, transpose_b, bias=dev.put(bias))
    want = (a.T if transpose_a else a) @ (b.T if transpose_b else b) + bias
    assert_close("lt_matmul", dev.get(out), want, atol=F32, rtol=F32)


def test_lt_matmul_rejects_bad_arguments():
    lt = _lt()
    a, b = np.zeros((4, 8), np.float32), np.zeros((8, 16), np.float32)
    out, aux = np.zeros((4, 16), np.float32), np.zeros((4, 16), np.float32)
    with pytest.raises(ValueError, match=r"lt_matmul: pass gelu_aux \(forward\) or dgelu_aux \(backward\), not both"):
        lt.lt_matmul(out, a, b, gelu_aux=aux, dgelu_aux=aux)
    with pytest.raises(ValueError, match=r"lt_matmul: dgelu_aux takes no bias"):
        lt.lt_matmul(out, a, b, bias=np.zeros(16, np.float32), dgelu_aux=aux)
    with pytest.raises(ValueError, match=r"lt_matmul: bias must have shape \(16,\), got \(8,\)"):
        lt.lt_matmul(out, a, b, bias=np.zeros(8, np.float32))
    with pytest.raises(TypeError, match=r"lt_matmul: gelu_aux must have dtype float32, got uint16"):
        lt.lt_matmul(out, a, b, gelu_aux=aux.astype(np.uint16))
    with pytest.raises(ValueError, match=r"lt_matmul: the GELU epilogues need out's row length N to be a multiple "
                                         r"of 8 \(cuBLASLt's aux leading dimension\), got N=12"):
        lt.lt_matmul(np.zeros((4, 12), np.float32), a, np.zeros((8, 12), np.float32),
                     gelu_aux=np.zeros((4, 12), np.float32))


def test_lt_descriptors_on_the_host():
    """The ctypes side that needs no GPU: the library loads, and a matmul descriptor takes
    every attribute lt_matmul sets (cuBLASLt rejects an unknown attribute number or a wrong
    size). Skipped where libcublasLt is not installed (CI's machines have none)."""
    lt = _lt()
    try:
        lt.library()
    except RuntimeError as e:
        pytest.skip(str(e))
    desc = lt._Desc()
    try:
        for epilogue in (lt.EPILOGUE_BIAS, lt.EPILOGUE_GELU_AUX_BIAS, lt.EPILOGUE_DGELU, lt.EPILOGUE_DEFAULT):
            desc.matmul(epilogue, 1, 0, bias_ptr=256, bias_type=lt.CUDA_R_16BF, aux_ptr=512, aux_ld=64)
        desc.layout(lt.CUDA_R_16BF, 64, 32, 64)
        desc.preference(lt.WORKSPACE_BYTES)
        with pytest.raises(RuntimeError, match="cublasLtMatmulDescSetAttribute"):
            desc._set(desc.made[0][1], 9999, lt.ctypes.c_int32(0))
    finally:
        desc.close()
