"""The GEMMs of the CUDA backend, for fp32 and bf16 arrays alike.

    gemm(out, a, b, transpose_a=False, transpose_b=False, accumulate=False)
        out = op(a) @ op(b)          (accumulate: out += op(a) @ op(b))
    gemm_strided_batched(out, a, b, transpose_a=False, transpose_b=False)
        out[i] = op(a[i]) @ op(b[i]) for every leading index i

Row-major arrays; op(x) is x or x.T. out is (M,N), op(a) (M,K), op(b) (K,N).

float32 arrays: cublasGemmEx with CUDA_R_32F and CUBLAS_COMPUTE_32F (no TF32)
on the GPU, NumPy's BLAS under emulation; accumulate is cuBLAS's beta = 1. uint16 arrays hold bf16 bit
patterns (llmcu.formats): what a tensor-core GEMM with fp32 accumulation
computes, the exact products of the bf16 inputs summed in fp32 and rounded
once to bf16 on output (with accumulate, out's old value is added in fp32
before that one rounding, cuBLAS's beta = 1):

- emu (NumPy): inputs widened to float32 exactly, NumPy's float32 matmul,
  then round to nearest even. The same result as the GPU's up to the order of
  the fp32 sums.
- cuda: cublasGemmEx / cublasGemmStridedBatchedEx with CUDA_R_16BF inputs and
  output and CUBLAS_COMPUTE_32F, on the raw device pointers, through ctypes on
  llmcu's own cuBLAS handle, on the current stream. tests/kernels/test_matmul.py's "cuda" cases
  passed on an H200 (2026-11-28) once accumulate went through an fp32 product
  (gemm's comment says why). That accumulate costs an fp32 product and a pass
  (kernels/matmul.cu matmul_gemm_accumulate_kernel1), so matmul_backward(
  accumulate_weight=False) takes the plain GEMM where the gradient was just
  zeroed (llmcu/cuda/gpt2.py).

Nothing here allocates after the first call with a given shape (the fp32
product is a runtime.scratch buffer), and the emulator's work goes through
Backend.run, so a step of GEMMs can be captured as a CUDA graph
(llmcu/cuda/graphs.py). On the GPU the GEMMs call libcublas through ctypes on
llmcu's own handle, set to the current CuPy stream on every call (_cublas_api
says why not CuPy's bindings).

cuBLAS is column-major. A row-major (R,S) array is, to cuBLAS, its (S,R)
transpose with leading dimension S. So the row-major product
out = op(a) @ op(b) is computed as the column-major out^T = op(b)^T @ op(a)^T:
cuBLAS's "A" is our b, its "B" our a, m = N, n = M, and each operand keeps its
own transpose flag (a row-major b (K,N) read as column-major is already the
(N,K) that out^T needs; a transposed b, stored (N,K), needs CUBLAS_OP_T).
"""

import numpy as np

from ..formats import bf16_bits_to_float32, float32_to_bf16_bits
from . import runtime
from .runtime import (BF16, FLOAT32, FLOATX_NAMES, backend_of, check_array, floatx_dtype, i64, launch_config,
                      load_library)

# From cuBLAS's and CUDA's headers (cublas_api.h, library_types.h).
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_POINTER_MODE_HOST = 0

_ONE = np.ones(1, np.float32)    # alpha, and beta when accumulating (host pointers)
_ZERO = np.zeros(1, np.float32)


def _shapes(fn, a, b, transpose_a, transpose_b):
    """(M, K, N) of op(a) @ op(b) for 2-D (or batched 3-D) operands."""
    M, K = (a.shape[-1], a.shape[-2]) if transpose_a else (a.shape[-2], a.shape[-1])
    Kb, N = (b.shape[-1], b.shape[-2]) if transpose_b else (b.shape[-2], b.shape[-1])
    if K != Kb:
        raise ValueError(f"{fn}: inner dimensions differ: op(a) is ({M},{K}), op(b) is ({Kb},{N}) "
                         f"(a {a.shape}, b {b.shape}, transpose_a={transpose_a}, "
                         f"transpose_b={transpose_b})")
    return M, K, N


def _check(fn, out, a, b, transpose_a, transpose_b, ndim):
    be = backend_of(a)
    dt = floatx_dtype(fn, "a", a)
    check_array(fn, "a", a, be, dtype=dt)
    check_array(fn, "b", b, be, dtype=dt)
    if a.ndim != ndim or b.ndim != ndim:
        raise ValueError(f"{fn}: a and b must be {ndim}-D, got shapes {a.shape} and {b.shape}")
    if ndim == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"{fn}: a and b must have the same batch size, got {a.shape} and {b.shape}")
    M, K, N = _shapes(fn, a, b, transpose_a, transpose_b)
    check_array(fn, "out", out, be, dtype=dt, shape=((a.shape[0],) if ndim == 3 else ()) + (M, N))
    return be, dt, M, K, N


def _op(x, transpose):
    return x.swapaxes(-1, -2) if transpose else x


def gemm(out, a, b, transpose_a=False, transpose_b=False, accumulate=False):
    """out (M,N) = op(a) @ op(b), or += with accumulate; fp32 or bf16 (see the module doc)."""
    be, dt, M, K, N = _check("gemm", out, a, b, transpose_a, transpose_b, 2)
    if be.name == "emu":
        be.run(_emu_gemm, out, a, b, transpose_a, transpose_b, accumulate)
    elif dt == FLOAT32:
        _cublas(out, a, b, M, K, N, transpose_a, transpose_b, accumulate, batch=None,
                in_type=CUDA_R_32F, out_type=CUDA_R_32F)
    elif accumulate:
        # out += product with ONE rounding: the product in fp32 (bf16 inputs, fp32 output),
        # then the sum in fp32, rounded once. cuBLAS's own beta = 1 on a bf16 out rounded
        # twice on an H200 (2026-11-28: dweight up to one bf16 ulp off, tests/kernels/test_matmul.py).
        product = runtime.scratch(be, "gemm_product", (M, N), np.float32)
        _cublas(product, a, b, M, K, N, transpose_a, transpose_b, False, batch=None,
                out_type=CUDA_R_32F)
        grid, block = launch_config(M * N)
        be.launch("matmul", "matmul_gemm_accumulate_kernel1", grid, block, (out, product, i64(M * N)),
                  floatX=FLOATX_NAMES[dt])
    else:
        _cublas(out, a, b, M, K, N, transpose_a, transpose_b, False, batch=None)


def gemm_strided_batched(out, a, b, transpose_a=False, transpose_b=False):
    """out[i] (M,N) = op(a[i]) @ op(b[i]) over the leading (batch) axis of 3-D arrays."""
    be, dt, M, K, N = _check("gemm_strided_batched", out, a, b, transpose_a, transpose_b, 3)
    if be.name == "emu":
        be.run(_emu_gemm, out, a, b, transpose_a, transpose_b, False)
    else:
        t = CUDA_R_32F if dt == FLOAT32 else CUDA_R_16BF
        _cublas(out, a, b, M, K, N, transpose_a, transpose_b, False, batch=a.shape[0],
                in_type=t, out_type=t)


def _emu_gemm(out, a, b, transpose_a, transpose_b, accumulate):
    """The CPU GEMM: NumPy's float32 matmul, or _emu_bf16 for bf16 bits."""
    if out.dtype == BF16:
        _emu_bf16(out, a, b, transpose_a, transpose_b, accumulate)
    elif accumulate:
        out += _op(a, transpose_a) @ _op(b, transpose_b)
    else:
        np.matmul(_op(a, transpose_a), _op(b, transpose_b), out=out)


def _emu_bf16(out, a, b, transpose_a, transpose_b, accumulate):
    """bf16 GEMM on the CPU: exact widening, float32 products and sums, one rounding."""
    product = np.matmul(_op(bf16_bits_to_float32(a), transpose_a),
                        _op(bf16_bits_to_float32(b), transpose_b))
    if accumulate:
        product += bf16_bits_to_float32(out)
    out[...] = float32_to_bf16_bits(product)


def _cublas(out, a, b, M, K, N, transpose_a, transpose_b, accumulate, batch,
            in_type=CUDA_R_16BF, out_type=CUDA_R_16BF):
    """cublasGemmEx / cublasGemmStridedBatchedEx on the raw device pointers: in_type
    inputs (bf16 or fp32), out_type output, fp32 compute (GPU only), on llmcu's own
    cuBLAS handle through ctypes (_cublas_api)."""
    import cupy

    want = BF16 if out_type == CUDA_R_16BF else FLOAT32
    if out.dtype != want:
        raise TypeError(f"gemm: out must have dtype {want}, got {out.dtype}")
    lib, handle = _cublas_api()
    _cublas_ok(lib.cublasSetStream_v2(handle, cupy.cuda.get_current_stream().ptr), "cublasSetStream_v2")
    alpha, beta = _ONE.ctypes.data, (_ONE if accumulate else _ZERO).ctypes.data  # host pointers
    # Column-major view (module doc): cuBLAS A = our b, cuBLAS B = our a.
    op_b = CUBLAS_OP_T if transpose_b else CUBLAS_OP_N
    op_a = CUBLAS_OP_T if transpose_a else CUBLAS_OP_N
    ld_b = b.shape[-1]    # row length of b as stored
    ld_a = a.shape[-1]    # row length of a as stored
    ld_out = N
    if batch is None:
        _cublas_ok(lib.cublasGemmEx(handle, op_b, op_a, N, M, K,
                                    alpha, b.data.ptr, in_type, ld_b,
                                    a.data.ptr, in_type, ld_a,
                                    beta, out.data.ptr, out_type, ld_out,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx")
    else:
        _cublas_ok(lib.cublasGemmStridedBatchedEx(handle, op_b, op_a, N, M, K,
                                                  alpha, b.data.ptr, in_type, ld_b, b.shape[1] * b.shape[2],
                                                  a.data.ptr, in_type, ld_a, a.shape[1] * a.shape[2],
                                                  beta, out.data.ptr, out_type, ld_out, M * N,
                                                  batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmStridedBatchedEx")


# -- cuBLAS through ctypes ------------------------------------------------------------
# CuPy's cuBLAS bindings refuse to run while a stream is being captured ("calling cuBLAS
# API during stream capture is currently unsupported": its setStream raises, H200,
# 2026-11-28), and a CUDA graph of the step needs its GEMMs. So llmcu calls libcublas
# itself, on a handle of its own per device with a workspace of its own (cuBLAS's advice
# for graph capture: no allocation inside a captured GEMM).

CUBLAS_WORKSPACE_BYTES = 32 * 1024 * 1024  # what PyTorch gives cuBLAS on Hopper (":4096:8")
_api = {}


def _cublas_ok(status, what):
    if status != 0:
        raise RuntimeError(f"gemm: {what} failed with cublasStatus_t {status}")


def _cublas_api():
    """(libcublas, this device's handle), made on first use."""
    import ctypes

    import cupy

    if "lib" not in _api:
        P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        _api["lib"] = load_library("libcublas", {
            "cublasCreate_v2": [ctypes.POINTER(P)], "cublasSetStream_v2": [P, P],
            "cublasSetWorkspace_v2": [P, P, ctypes.c_size_t],
            "cublasGemmEx": [P, I, I, I, I, I, P, P, I, I, P, I, I, P, P, I, I, I, I],
            "cublasGemmStridedBatchedEx": [P, I, I, I, I, I, P, P, I, I, L, P, I, I, L, P, P, I,
                                           I, L, I, I, I]})
    dev = cupy.cuda.Device().id
    if dev not in _api:
        lib, handle = _api["lib"], ctypes.c_void_p()
        _cublas_ok(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate_v2")
        ws = cupy.empty(CUBLAS_WORKSPACE_BYTES, dtype=np.uint8)  # kept for the handle's lifetime
        _cublas_ok(lib.cublasSetWorkspace_v2(handle, ws.data.ptr, ws.nbytes), "cublasSetWorkspace_v2")
        _api[dev] = (handle, ws)
    return _api["lib"], _api[dev][0]
