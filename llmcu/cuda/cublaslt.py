"""GEMMs with fused epilogues through cuBLASLt (ctypes), and their CPU emulation.

    lt_matmul(out, a, b, transpose_a=False, transpose_b=False, bias=None,
              gelu_aux=None, dgelu_aux=None)

Row-major, as llmcu/cuda/gemm.py: out (M,N) = op(a) (M,K) @ op(b) (K,N), then
the epilogue, in fp32 before out's single rounding:

- bias (N,):       out = product + bias                    (CUBLASLT_EPILOGUE_BIAS)
- gelu_aux (M,N):  gelu_aux = product + bias, out = gelu(gelu_aux)
                   (CUBLASLT_EPILOGUE_GELU_AUX_BIAS: the fc layer and its GELU in
                   one GEMM; gelu_aux keeps the GELU's input for the backward)
- dgelu_aux (M,N): out = product * gelu'(dgelu_aux)        (CUBLASLT_EPILOGUE_DGELU:
                   the backward of the GELU applied to the GEMM giving its gradient)

GELU is GPT-2's tanh approximation (llmcu/cpu/gelu.py's formulas under the emulator). All arrays bf16 (uint16 bit patterns) or all
float32. The point is bytes: an unfused bias add reads and writes the output once
more, and the GELU forward and backward each read and write a (B,T,4C) tensor;
an epilogue does that work while the tile is still in registers (llm.c's route).

On the GPU this calls libcublasLt directly with ctypes (CuPy binds cuBLAS, not
cuBLASLt): one handle per device, descriptors per call (host-only and cheap),
the heuristic's algorithm cached per shape and epilogue, a 32 MiB workspace
from runtime.scratch, the current CuPy stream. No allocation after the first
call of a shape, so it can be captured in a CUDA graph. The enum values and the
heuristic-result layout are cuBLASLt 13's (cublasLt.h; checked against the
header with a C compiler when this was written, and the descriptor calls are
run on the CPU by tests/test_cublaslt.py where the library is installed).
Under the emulator the same arithmetic runs in NumPy: the product in float32,
the epilogue in float32, one rounding, so tests check the plumbing (shapes,
which tensor is which) against the unfused kernels.

Measured on an H200 (2026-11-28, bf16 d12 B=16 T=1024, benchmarks/bench_gpu_step.py
--gemm cublas,cublaslt, one run): 37.8 ms a step against 42.0 ms with cuBLAS and
llmcu's bias and GELU kernels (0.90x), the forward GEMMs at 400-750 TFLOP/s where
cuBLAS's gemmEx ran them at 270-560; so the GPT-2 model uses it by default on a
GPU (GPT2(gemm="auto")).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from . import runtime
from .gemm import _check as _check_gemm
from .runtime import BF16, check_array

# cublasLt.h / library_types.h / cublas_api.h (cuBLAS 13)
CUBLAS_COMPUTE_32F = 68
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE = 3, 4, 7
DESC_BIAS_POINTER, DESC_AUX_POINTER, DESC_AUX_LD = 8, 11, 12
DESC_BIAS_DATA_TYPE = 26
PREF_MAX_WORKSPACE_BYTES = 1
PREF_REDUCTION_SCHEME_MASK = 3
REDUCTION_SCHEME_COMPUTE_TYPE = 2  # split-K partial sums in fp32 only (not in bf16: see preference())
EPILOGUE_DEFAULT, EPILOGUE_BIAS = 1, 4
EPILOGUE_GELU_AUX_BIAS = 32 | 128 | 4
EPILOGUE_DGELU = 64 | 128
WORKSPACE_BYTES = 32 * 1024 * 1024


class _Heuristic(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t: 96 bytes (algo at 0, workspaceSize at 64,
    state at 72, wavesCount at 76)."""
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t),
                ("state", ctypes.c_int), ("wavesCount", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


assert ctypes.sizeof(_Heuristic) == 96


def library_candidates(stem: str = "libcublasLt") -> list[str]:
    """Where libcublasLt (or libcublas: stem) may be: the soname (already loaded by CuPy's
    cuBLAS, or on the loader path), NVIDIA's pip wheels (nvidia/cu13/lib,
    nvidia/cublas/lib), the toolkit."""
    names = [f"{stem}.so.13", f"{stem}.so.12", f"{stem}.so"]
    dirs = []
    try:
        import nvidia
        for base in nvidia.__path__:
            dirs += [Path(base) / "cu13" / "lib", Path(base) / "cublas" / "lib"]
    except ImportError:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "lib64")
    dirs.append(Path("/usr/local/cuda/lib64"))
    return names + [str(d / n) for d in dirs for n in names if (d / n).is_file()]


_lib = None


def load_library(stem: str, signatures: dict):
    """The first of library_candidates(stem) that loads (ctypes.CDLL), with each function in
    signatures given its argument types and an int (status) result; RuntimeError naming
    every place it looked."""
    tried = []
    for cand in library_candidates(stem):
        try:
            lib = ctypes.CDLL(cand)
            break
        except OSError as e:
            tried.append(f"{cand}: {e}")
    else:
        raise RuntimeError(f"{stem} not found (install nvidia-cublas or the CUDA toolkit); tried "
                           + "; ".join(tried))
    for name, args in signatures.items():  # every argument typed: no int truncation
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, args
    return lib


def library():
    """The loaded libcublasLt (ctypes.CDLL); RuntimeError naming where it looked."""
    global _lib
    if _lib is None:
        _lib = load_library("libcublasLt", _SIGNATURES)
    return _lib


_P, _PP, _INT, _SIZE = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_size_t
_SIGNATURES = {  # cublasLt.h; handles and descriptors are pointers, enums int
    "cublasLtCreate": [_PP],
    "cublasLtMatmulDescCreate": [_PP, _INT, _INT],
    "cublasLtMatmulDescSetAttribute": [_P, _INT, _P, _SIZE],
    "cublasLtMatmulDescDestroy": [_P],
    "cublasLtMatrixLayoutCreate": [_PP, _INT, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatrixLayoutDestroy": [_P],
    "cublasLtMatmulPreferenceCreate": [_PP],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _INT, _P, _SIZE],
    "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, _INT, ctypes.POINTER(_Heuristic),
                                       ctypes.POINTER(_INT)],
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _SIZE, _P],
}


def _ok(status, what):
    if status != 0:
        raise RuntimeError(f"cublaslt: {what} failed with cublasStatus_t {status}")


class _Desc:
    """The matmul and layout descriptors of one call (host objects), destroyed on close."""

    def __init__(self):
        self.lib, self.made = library(), []

    def matmul(self, epilogue, transa, transb, bias_ptr=0, bias_type=None, aux_ptr=0, aux_ld=0):
        d = ctypes.c_void_p()
        _ok(self.lib.cublasLtMatmulDescCreate(ctypes.byref(d), CUBLAS_COMPUTE_32F, CUDA_R_32F),
            "cublasLtMatmulDescCreate")
        self.made.append(("cublasLtMatmulDescDestroy", d))
        self._set(d, DESC_TRANSA, ctypes.c_int32(transa))
        self._set(d, DESC_TRANSB, ctypes.c_int32(transb))
        self._set(d, DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        if bias_ptr:
            self._set(d, DESC_BIAS_POINTER, ctypes.c_void_p(bias_ptr))
            self._set(d, DESC_BIAS_DATA_TYPE, ctypes.c_int32(bias_type))
        if aux_ptr:
            self._set(d, DESC_AUX_POINTER, ctypes.c_void_p(aux_ptr))
            self._set(d, DESC_AUX_LD, ctypes.c_int64(aux_ld))
        return d

    def _set(self, d, attr, value):
        _ok(self.lib.cublasLtMatmulDescSetAttribute(d, attr, ctypes.addressof(value), ctypes.sizeof(value)),
            f"cublasLtMatmulDescSetAttribute({attr})")

    def layout(self, dtype, rows, cols, ld):
        lay = ctypes.c_void_p()
        _ok(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dtype, rows, cols, ld),
            "cublasLtMatrixLayoutCreate")
        self.made.append(("cublasLtMatrixLayoutDestroy", lay))
        return lay

    def preference(self, workspace_bytes):
        p = ctypes.c_void_p()
        _ok(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(p)), "cublasLtMatmulPreferenceCreate")
        self.made.append(("cublasLtMatmulPreferenceDestroy", p))
        ws = ctypes.c_uint64(workspace_bytes)
        _ok(self.lib.cublasLtMatmulPreferenceSetAttribute(p, PREF_MAX_WORKSPACE_BYTES, ctypes.addressof(ws),
                                                          ctypes.sizeof(ws)),
            "cublasLtMatmulPreferenceSetAttribute")
        # Split-K reductions in the compute type (fp32) only: with all schemes allowed, a bf16
        # GEMM (33x100 @ 100x24) came out up to 8 bf16 ulps from cuBLAS's on an H200
        # (2026-11-28), as from partial sums rounded to bf16 (the output type).
        mask = ctypes.c_uint32(REDUCTION_SCHEME_COMPUTE_TYPE)
        _ok(self.lib.cublasLtMatmulPreferenceSetAttribute(p, PREF_REDUCTION_SCHEME_MASK, ctypes.addressof(mask),
                                                          ctypes.sizeof(mask)),
            "cublasLtMatmulPreferenceSetAttribute(REDUCTION_SCHEME_MASK)")
        return p

    def close(self):
        for fn, obj in reversed(self.made):
            getattr(self.lib, fn)(obj)
        self.made.clear()


_handles: dict = {}
_algos: dict = {}
_ONE = np.ones(1, np.float32)
_ZERO = np.zeros(1, np.float32)


def _handle():
    import cupy
    dev = cupy.cuda.Device().id
    if dev not in _handles:
        h = ctypes.c_void_p()
        _ok(library().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
        _handles[dev] = h
    return _handles[dev]


def _check(fn, out, a, b, transpose_a, transpose_b, bias, gelu_aux, dgelu_aux):
    be, dt, M, K, N = _check_gemm(fn, out, a, b, transpose_a, transpose_b, 2)
    if gelu_aux is not None and dgelu_aux is not None:
        raise ValueError(f"{fn}: pass gelu_aux (forward) or dgelu_aux (backward), not both")
    if dgelu_aux is not None and bias is not None:
        raise ValueError(f"{fn}: dgelu_aux takes no bias (CUBLASLT_EPILOGUE_DGELU)")
    if bias is not None:
        check_array(fn, "bias", bias, be, dtype=dt, shape=(N,))
    for name, aux in (("gelu_aux", gelu_aux), ("dgelu_aux", dgelu_aux)):
        if aux is not None:
            check_array(fn, name, aux, be, dtype=dt, shape=(M, N))
    if (gelu_aux is not None or dgelu_aux is not None) and N % 8:
        raise ValueError(f"{fn}: the GELU epilogues need out's row length N to be a multiple of 8 "
                         f"(cuBLASLt's aux leading dimension), got N={N}")
    return be, dt, M, K, N


def lt_matmul(out, a, b, transpose_a=False, transpose_b=False, bias=None, gelu_aux=None,
              dgelu_aux=None):
    """out = epilogue(op(a) @ op(b)) (module doc); every array fp32 or every array bf16."""
    be, dt, M, K, N = _check("lt_matmul", out, a, b, transpose_a, transpose_b, bias, gelu_aux,
                             dgelu_aux)
    if be.name == "emu":
        be.run(_emu_lt_matmul, out, a, b, transpose_a, transpose_b, bias, gelu_aux, dgelu_aux)
        return
    import cupy
    if gelu_aux is not None:
        epilogue, aux = EPILOGUE_GELU_AUX_BIAS if bias is not None else (32 | 128), gelu_aux
    elif dgelu_aux is not None:
        epilogue, aux = EPILOGUE_DGELU, dgelu_aux
    else:
        epilogue, aux = (EPILOGUE_BIAS if bias is not None else EPILOGUE_DEFAULT), None
    t = CUDA_R_16BF if dt == BF16 else CUDA_R_32F
    # column-major view (llmcu/cuda/gemm.py): cuBLAS A = our b, B = our a, D = out^T (N x M);
    # a bias per column of out is a bias per row of D, as cuBLASLt's bias epilogue wants
    op_b = CUBLAS_OP_T if transpose_b else CUBLAS_OP_N
    op_a = CUBLAS_OP_T if transpose_a else CUBLAS_OP_N
    rows_b, cols_b = (K, N) if transpose_b else (N, K)   # b as stored, column-major
    rows_a, cols_a = (M, K) if transpose_a else (K, M)
    ws = runtime.scratch(be, "cublaslt_workspace", (WORKSPACE_BYTES,), np.uint8)
    desc = _Desc()
    try:
        d = desc.matmul(epilogue, op_b, op_a, bias.data.ptr if bias is not None else 0, t,
                        aux.data.ptr if aux is not None else 0, N)
        la = desc.layout(t, rows_b, cols_b, b.shape[-1])
        lb = desc.layout(t, rows_a, cols_a, a.shape[-1])
        ld = desc.layout(t, N, M, N)
        key = (dt.str, M, K, N, op_a, op_b, epilogue, _alignment(out, a, b, bias, aux))
        algo = _algos.get(key)
        if algo is None:
            pref = desc.preference(WORKSPACE_BYTES)
            result, count = _Heuristic(), ctypes.c_int(0)
            _ok(library().cublasLtMatmulAlgoGetHeuristic(_handle(), d, la, lb, ld, ld, pref, 1,
                                                         ctypes.byref(result), ctypes.byref(count)),
                "cublasLtMatmulAlgoGetHeuristic")
            if count.value == 0:
                raise RuntimeError(f"cublaslt: no algorithm for {key}")
            algo = _algos[key] = result
        stream = cupy.cuda.get_current_stream().ptr
        _ok(library().cublasLtMatmul(_handle(), d, ctypes.c_void_p(_ONE.ctypes.data),
                                     ctypes.c_void_p(b.data.ptr), la, ctypes.c_void_p(a.data.ptr), lb,
                                     ctypes.c_void_p(_ZERO.ctypes.data),
                                     ctypes.c_void_p(out.data.ptr), ld, ctypes.c_void_p(out.data.ptr), ld,
                                     ctypes.addressof(algo.algo), ctypes.c_void_p(ws.data.ptr),
                                     ctypes.c_size_t(WORKSPACE_BYTES), ctypes.c_void_p(stream)),
            "cublasLtMatmul")
    finally:
        desc.close()


def _alignment(*arrays) -> tuple:
    """The 16-byte alignment of each pointer: the heuristic's choice depends on it."""
    return tuple(None if x is None else x.data.ptr % 16 for x in arrays)


# -- the emulator's arithmetic --------------------------------------------------

def _emu_lt_matmul(out, a, b, transpose_a, transpose_b, bias, gelu_aux, dgelu_aux):
    from ..cpu.gelu import gelu_backward, gelu_forward
    from ..formats import bf16_bits_to_float32, float32_to_bf16_bits
    bf16 = out.dtype == BF16
    wide = (lambda x: bf16_bits_to_float32(x)) if bf16 else (lambda x: x)
    narrow = float32_to_bf16_bits if bf16 else (lambda x: x.astype(np.float32))
    pa, pb = wide(a), wide(b)
    product = ((pa.T if transpose_a else pa) @ (pb.T if transpose_b else pb)).astype(np.float32)
    if bias is not None:
        product += wide(bias)
    result = np.empty_like(product)
    if gelu_aux is not None:  # the GELU of the fp32 pre-activation; its rounding kept for the backward
        gelu_aux[...] = narrow(product)
        gelu_forward(result, product)
    elif dgelu_aux is not None:
        gelu_backward(result, product, wide(dgelu_aux).astype(np.float32))
    else:
        result = product
    out[...] = narrow(result)

