"""GEMMs with fused epilogues through cuBLASLt (ctypes), and their CPU emulation.

    lt_matmul(out, a, b, transpose_a=False, transpose_b=False, bias=None,
              gelu_aux=None, dgelu_aux=None, a_row_sums=None, tune=False)

Row-major, as llmcu/cuda/gemm.py: out (M,N) = op(a) (M,K) @ op(b) (K,N), then
the epilogue, in fp32 before out's single rounding:

- bias (N,):       out = product + bias                    (CUBLASLT_EPILOGUE_BIAS)
- gelu_aux (M,N):  gelu_aux = product + bias, out = gelu(gelu_aux)
                   (CUBLASLT_EPILOGUE_GELU_AUX_BIAS: the fc layer and its GELU in
                   one GEMM; gelu_aux keeps the GELU's input for the backward)
- dgelu_aux (M,N): out = product * gelu'(dgelu_aux)        (CUBLASLT_EPILOGUE_DGELU:
                   the backward of the GELU applied to the GEMM giving its gradient)
- a_row_sums (M,): also a_row_sums[i] = sum over k of op(a)[i, k], summed in fp32 and
                   rounded once (CUBLASLT_EPILOGUE_BGRADB, cuBLAS's B being our a): for
                   the weight gradient dweight = dout^T @ inp (transpose_a=True) these are
                   the bias gradient's column sums of dout, computed by the GEMM that
                   reads dout anyway instead of by a second pass over it. Overwrites
                   (cuBLASLt has no accumulating form); no other epilogue with it.

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
run on the CPU by tests/kernels/test_cublaslt.py where the library is installed).
Under the emulator the same arithmetic runs in NumPy: the product in float32,
the epilogue in float32, one rounding, so tests check the plumbing (shapes,
which tensor is which) against the unfused kernels.

Measured on an H200 (2026-11-28, bf16 d12 B=16 T=1024, benchmarks/bench_gpu_step.py
--gemm cublas,cublaslt, one run): 37.8 ms a step against 42.0 ms with cuBLAS and
llmcu's bias and GELU kernels (0.90x), the forward GEMMs at 400-750 TFLOP/s where
cuBLAS's gemmEx ran them at 270-560; so the GPT-2 model uses it by default on a
GPU (GPT2(gemm="auto")).

Autotuning (opt-in: tune=True, or the GEMM libraries "cublaslt_tuned" /
"cublaslt_all_tuned" of llmcu/cuda/matmul.py). The heuristic's first algorithm ran
these GEMMs unevenly on that H200 against a measured 769 TFLOP/s bf16 GEMM ceiling
(fc forward with GELU_AUX_BIAS 405 TFLOP/s where the same-size fcproj forward ran
at 753; fcproj's DGELU backward 517, attproj backward 438, qkv forward 502). With
tuning, the first call of a key asks the heuristic for up to TUNE_CANDIDATES
algorithms, runs each usable one TUNE_WARMUP + TUNE_REPS times on the call's own
arrays (CUDA events on the current stream; out is overwritten with beta = 0, so
the reruns are idempotent, and lt_matmul refuses a written array that overlaps an
input), keeps the fastest median (choose_fastest), and caches it under the key and
the tuning flag, so tuned and untuned choices coexist in one process and a
benchmark compares them in one run. Nothing is tuned while a CUDA graph is being
captured (the timing synchronizes): the tuned algorithm if the key has one, else
the untuned heuristic choice (not recorded as tuned). tuning_report() lists every
decision (each candidate's median ms, the chosen one, the heuristic's first) and
tuning_lines() formats it for a log. What tuning buys on a GPU: not measured yet.
Under the emulator tune=True changes nothing (the arithmetic is NumPy's).
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import runtime
from .gemm import _check as _check_gemm
from .runtime import BF16, check_array, load_library
from .vectorized import overlaps

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
EPILOGUE_BGRADB = 512
EPILOGUE_GELU_AUX = 32 | 128
EPILOGUE_NAMES = {EPILOGUE_DEFAULT: "DEFAULT", EPILOGUE_BIAS: "BIAS", EPILOGUE_GELU_AUX: "GELU_AUX",
                  EPILOGUE_GELU_AUX_BIAS: "GELU_AUX_BIAS", EPILOGUE_DGELU: "DGELU",
                  EPILOGUE_BGRADB: "BGRADB"}
WORKSPACE_BYTES = 32 * 1024 * 1024
# autotuning (module doc): candidates asked of the heuristic, and runs of each (the warm-up
# ones untimed; the median of the timed ones decides)
TUNE_CANDIDATES = 8
TUNE_WARMUP, TUNE_REPS = 2, 5


class _Heuristic(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t: 96 bytes (algo at 0, workspaceSize at 64,
    state at 72, wavesCount at 76)."""
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t),
                ("state", ctypes.c_int), ("wavesCount", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


assert ctypes.sizeof(_Heuristic) == 96


_lib = None


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
_algos: dict = {}    # (key, tuned) -> _Heuristic: the algorithm lt_matmul runs for that GEMM
_tuning: list = []   # tuning_report(): one dict per tuned key, in the order they were tuned
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


def _heuristics(lib, handle, d, la, lb, ld, pref, n, key) -> list:
    """Up to n algorithms for the GEMM described by d and the layouts (C and D share ld),
    the heuristic's order, as copies that outlive the result array; RuntimeError naming
    key when there is none."""
    results, count = (_Heuristic * n)(), ctypes.c_int(0)
    _ok(lib.cublasLtMatmulAlgoGetHeuristic(handle, d, la, lb, ld, ld, pref, n, results,
                                           ctypes.pointer(count)),
        "cublasLtMatmulAlgoGetHeuristic")
    if not 0 < count.value <= n:
        raise RuntimeError(f"cublaslt: no algorithm for {key} (the heuristic returned "
                           f"{count.value} of at most {n})")
    return [_Heuristic.from_buffer_copy(results[i]) for i in range(count.value)]


def choose_fastest(candidates, run_and_time, key=None):
    """(index, times): run_and_time(candidate) -> its median milliseconds, or None when it
    failed (a nonzero status); times[i] is candidate i's, index the fastest that ran (the
    heuristic's earlier one on a tie). RuntimeError naming key when none ran."""
    times = [run_and_time(c) for c in candidates]
    ran = [i for i, t in enumerate(times) if t is not None]
    if not ran:
        raise RuntimeError(f"cublaslt: all {len(times)} candidate algorithms failed for {key}")
    return min(ran, key=lambda i: times[i]), times


def pick_algo(key, tune, capturing, heuristics, run_and_time, label=None):
    """The algorithm for one GEMM, cached in _algos under (key, tune). heuristics(n) -> the
    heuristic's first <= n candidates (at least one); run_and_time as choose_fastest's.
    Untuned: the heuristic's first. Tuned: the fastest of TUNE_CANDIDATES, recorded in
    tuning_report() with label's entries (shape, epilogue). While a CUDA graph is being
    captured (capturing) nothing is timed: the tuned algorithm if key has one, else the
    untuned one, which is not cached as tuned, so the next call outside a capture tunes."""
    algo = _algos.get((key, tune))
    if algo is not None:
        return algo
    if not tune or capturing:
        algo = _algos.get((key, False))
        if algo is None:
            algo = _algos[(key, False)] = heuristics(1)[0]
        return algo
    found = heuristics(TUNE_CANDIDATES)
    index, times = choose_fastest(found, run_and_time, key)
    _tuning.append(dict(label or {}, key=key, candidates=len(found), ms=times, chosen=index,
                        chosen_ms=times[index], heuristic_first_ms=times[0]))
    algo = _algos[(key, True)] = found[index]
    return algo


def tuning_report() -> list[dict]:
    """Every tuning decision of this process, oldest first: dicts with the GEMM's dtype, M,
    K, N, transposes and epilogue name, key (the cache key), candidates (how many the
    heuristic gave), ms (each candidate's median milliseconds, None where it failed),
    chosen (the index run from then on), chosen_ms, heuristic_first_ms (candidate 0's,
    what the untuned path runs; None if it failed)."""
    return [dict(entry, ms=list(entry["ms"])) for entry in _tuning]


def tuning_lines(entries=None) -> list[str]:
    """tuning_report() (or entries from it) as one log line per tuned GEMM."""
    def ms(t):
        return "fail" if t is None else f"{t:.4f}"
    lines = []
    for e in tuning_report() if entries is None else entries:
        first = e["heuristic_first_ms"]
        gain = f" ({e['chosen_ms'] / first:.3f}x the heuristic's first)" if first else ""
        lines.append(f"tuned {e.get('dtype', '?')} M={e.get('M')} K={e.get('K')} N={e.get('N')} "
                     f"ta={int(bool(e.get('transpose_a')))} tb={int(bool(e.get('transpose_b')))} "
                     f"{e.get('epilogue', '?')}: {e['candidates']} candidates, chose #{e['chosen']} "
                     f"{ms(e['chosen_ms'])} ms{gain}; all ms: {' '.join(ms(t) for t in e['ms'])}")
    return lines


def _check(fn, out, a, b, transpose_a, transpose_b, bias, gelu_aux, dgelu_aux, tune=False, a_row_sums=None):
    if not isinstance(tune, bool):
        raise TypeError(f"{fn}: tune must be a bool, got {type(tune).__name__}")
    be, dt, M, K, N = _check_gemm(fn, out, a, b, transpose_a, transpose_b, 2)
    if gelu_aux is not None and dgelu_aux is not None:
        raise ValueError(f"{fn}: pass gelu_aux (forward) or dgelu_aux (backward), not both")
    if dgelu_aux is not None and bias is not None:
        raise ValueError(f"{fn}: dgelu_aux takes no bias (CUBLASLT_EPILOGUE_DGELU)")
    if a_row_sums is not None:
        if bias is not None or gelu_aux is not None or dgelu_aux is not None:
            raise ValueError(f"{fn}: a_row_sums (CUBLASLT_EPILOGUE_BGRADB) takes no bias, gelu_aux "
                             f"or dgelu_aux")
        check_array(fn, "a_row_sums", a_row_sums, be, dtype=dt, shape=(M,))
    if bias is not None:
        check_array(fn, "bias", bias, be, dtype=dt, shape=(N,))
    for name, aux in (("gelu_aux", gelu_aux), ("dgelu_aux", dgelu_aux)):
        if aux is not None:
            check_array(fn, name, aux, be, dtype=dt, shape=(M, N))
    if (gelu_aux is not None or dgelu_aux is not None) and N % 8:
        raise ValueError(f"{fn}: the GELU epilogues need out's row length N to be a multiple of 8 "
                         f"(cuBLASLt's aux leading dimension), got N={N}")
    if tune:  # tuning reruns the GEMM: an input it overwrote would change the later runs
        written = dict(out=out, gelu_aux=gelu_aux, a_row_sums=a_row_sums)
        read = dict(a=a, b=b, bias=bias, dgelu_aux=dgelu_aux)
        for wname, w in written.items():
            for rname, r in read.items():
                if w is not None and r is not None and overlaps(w, r):
                    raise ValueError(f"{fn}: with tune=True, {wname} (written) must not overlap "
                                     f"{rname} (read): each candidate algorithm reruns the GEMM")
    return be, dt, M, K, N


def _capturing(be) -> bool:
    """A CUDA graph capture in progress: llmcu/cuda/graphs.py's flag, or the stream's own
    state (a capture begun outside llmcu). A query that fails counts as capturing (the
    runtime refuses it on the legacy stream while another stream captures)."""
    if be.capturing:
        return True
    import cupy
    is_capturing = getattr(cupy.cuda.get_current_stream(), "is_capturing", None)
    try:
        return bool(is_capturing()) if is_capturing is not None else False
    except Exception:  # noqa: BLE001 (cudaErrorStreamCaptureImplicit and the like)
        return True


def lt_matmul(out, a, b, transpose_a=False, transpose_b=False, bias=None, gelu_aux=None,
              dgelu_aux=None, a_row_sums=None, tune=False):
    """out = epilogue(op(a) @ op(b)) (module doc); every array fp32 or every array bf16.
    tune=True: the fastest of the heuristic's candidates for this key (module doc)."""
    be, dt, M, K, N = _check("lt_matmul", out, a, b, transpose_a, transpose_b, bias, gelu_aux,
                             dgelu_aux, tune, a_row_sums)
    if be.name == "emu":
        be.run(_emu_lt_matmul, out, a, b, transpose_a, transpose_b, bias, gelu_aux, dgelu_aux, a_row_sums)
        return
    import cupy
    if gelu_aux is not None:
        epilogue, aux = EPILOGUE_GELU_AUX_BIAS if bias is not None else EPILOGUE_GELU_AUX, gelu_aux
    elif dgelu_aux is not None:
        epilogue, aux = EPILOGUE_DGELU, dgelu_aux
    elif a_row_sums is not None:  # the bias-gradient vector goes where a bias would
        epilogue, aux, bias = EPILOGUE_BGRADB, None, a_row_sums
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
    lib, handle = library(), _handle()
    stream = cupy.cuda.get_current_stream()
    desc = _Desc()
    try:
        d = desc.matmul(epilogue, op_b, op_a, bias.data.ptr if bias is not None else 0, t,
                        aux.data.ptr if aux is not None else 0, N)
        la = desc.layout(t, rows_b, cols_b, b.shape[-1])
        lb = desc.layout(t, rows_a, cols_a, a.shape[-1])
        ld = desc.layout(t, N, M, N)
        key = (dt.str, M, K, N, op_a, op_b, epilogue, _alignment(out, a, b, bias, aux))

        def call(algo) -> int:  # the cublasStatus_t of one launch on the current stream
            return lib.cublasLtMatmul(handle, d, ctypes.c_void_p(_ONE.ctypes.data),
                                      ctypes.c_void_p(b.data.ptr), la, ctypes.c_void_p(a.data.ptr), lb,
                                      ctypes.c_void_p(_ZERO.ctypes.data),
                                      ctypes.c_void_p(out.data.ptr), ld, ctypes.c_void_p(out.data.ptr), ld,
                                      ctypes.addressof(algo.algo), ctypes.c_void_p(ws.data.ptr),
                                      ctypes.c_size_t(WORKSPACE_BYTES), ctypes.c_void_p(stream.ptr))

        def heuristics(n):
            return _heuristics(lib, handle, d, la, lb, ld, desc.preference(WORKSPACE_BYTES), n, key)

        label = dict(dtype="bf16" if dt == BF16 else "fp32", M=M, K=K, N=N, transpose_a=transpose_a,
                     transpose_b=transpose_b, epilogue=EPILOGUE_NAMES.get(epilogue, str(epilogue)))
        algo = pick_algo(key, tune, tune and _capturing(be), heuristics,
                         lambda candidate: _time_on_stream(call, candidate, stream), label)
        _ok(call(algo), "cublasLtMatmul")
    finally:
        desc.close()


def _time_on_stream(call, candidate, stream):
    """The median milliseconds of TUNE_REPS calls of one candidate algorithm after
    TUNE_WARMUP untimed ones (CUDA events on stream), or None when the heuristic marked it
    unusable (state) or a call returned a nonzero status."""
    import cupy
    if candidate.state != 0:
        return None
    for _ in range(TUNE_WARMUP):
        if call(candidate) != 0:
            return None
    times = []
    for _ in range(TUNE_REPS):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        status = call(candidate)
        end.record(stream)
        end.synchronize()
        if status != 0:
            return None
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def _alignment(*arrays) -> tuple:
    """The 16-byte alignment of each pointer: the heuristic's choice depends on it."""
    return tuple(None if x is None else x.data.ptr % 16 for x in arrays)


# -- the emulator's arithmetic --------------------------------------------------

def _emu_lt_matmul(out, a, b, transpose_a, transpose_b, bias, gelu_aux, dgelu_aux, a_row_sums=None):
    from ..cpu.gelu import gelu_backward, gelu_forward
    from ..formats import bf16_bits_to_float32, float32_to_bf16_bits
    bf16 = out.dtype == BF16
    wide = (lambda x: bf16_bits_to_float32(x)) if bf16 else (lambda x: x)
    narrow = float32_to_bf16_bits if bf16 else (lambda x: x.astype(np.float32))
    pa, pb = wide(a), wide(b)
    if a_row_sums is not None:  # fp32 sums over k of op(a)'s rows, one rounding
        a_row_sums[...] = narrow((pa.T if transpose_a else pa).sum(axis=1, dtype=np.float32))
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

