"""Linear layer out = inp @ weight.T + bias: GEMMs through llmcu.cuda.gemm
(cuBLAS on the GPU, NumPy under emulation; fp32, or bf16 with fp32
accumulation), bias kernels from kernels/matmul.cu.

Same functions and signatures as llmcu/cpu/matmul.py. Shapes: inp (...,C),
weight (OC,C), bias (OC,) or None, out (...,OC). Parameter gradients
accumulate (+=); activation gradients overwrite (=). Arrays are floatX:
float32, or uint16 holding bf16 (the dtype of inp picks the build).

bf16 rounding, per output element: out is the GEMM rounded once, then the
bias added and rounded again (two roundings; a fused cuBLASLt bias epilogue
would make it one); dinp one rounding; dweight one (the GEMM adds the old
dweight in fp32, cuBLAS's beta = 1); dbias one (fp32 column sum, then +=).
matmul_backward(..., accumulate_weight=False) overwrites dweight and dbias (=)
instead, as llmcu/cpu/matmul.py (the first backward after zero_grad).

matmul_backward(..., version=) picks the bias-gradient kernels of
kernels/matmul.cu (the GEMMs are cuBLAS's either way):
  1: one thread per column walking all N rows (only OC threads);
  2 (the default): two passes, deterministic: blocks of 32 columns x a slice of
     the rows write fp32 partial column sums (16-byte loads when OC % (16 //
     itemsize) == 0 and dout is 16-byte aligned) to a scratch buffer, and a
     second kernel sums them in a fixed order into dbias.
"""

from . import runtime
from .cublaslt import lt_matmul
from .gelu import gelu_backward, gelu_forward
from .gemm import gemm
from .runtime import FLOATX_NAMES, WARP, backend_of, check_array, floatx_dtype, i32, launch_config
from .vectorized import vectorizable

BIAS_BACKWARD_VERSIONS = (1, 2)


def _check(fn, be, inp, weight, **named):
    dt = floatx_dtype(fn, "inp", inp)
    check_array(fn, "inp", inp, be, dtype=dt)
    check_array(fn, "weight", weight, be, dtype=dt)
    C = inp.shape[-1]
    N = inp.size // C
    if weight.ndim != 2 or weight.shape[1] != C:
        raise ValueError(f"{fn}: weight must be (OC,{C}), got {weight.shape}")
    OC = weight.shape[0]
    shapes = {"out": (*inp.shape[:-1], OC), "dout": (*inp.shape[:-1], OC), "dinp": inp.shape,
              "bias": (OC,), "dbias": (OC,), "dweight": (OC, C)}
    for name, a in named.items():
        if a is not None:
            check_array(fn, name, a, be, dtype=dt, shape=shapes[name])
    return N, C, OC, FLOATX_NAMES[dt]


# "cublas": cuBLAS GEMMs and llmcu's bias / GELU kernels; "cublaslt": the forward GEMMs and
# the GELU's backward on cuBLASLt with epilogues, the other backward GEMMs on cuBLAS;
# "cublaslt_all": every GEMM that overwrites its output on cuBLASLt (the accumulating
# dweight GEMM of gradient accumulation stays on cuBLAS: one rounding, see gemm.py).
# "..._tuned": the same routing with cuBLASLt's algorithm autotuned per shape on first use
# (lt_matmul(tune=True), llmcu/cuda/cublaslt.py; its speed not measured on a GPU yet).
GEMM_LIBRARIES = ("cublas", "cublaslt", "cublaslt_all", "cublaslt_tuned", "cublaslt_all_tuned")
LT = ("cublaslt", "cublaslt_all", "cublaslt_tuned", "cublaslt_all_tuned")
LT_ALL = ("cublaslt_all", "cublaslt_all_tuned")
TUNED = ("cublaslt_tuned", "cublaslt_all_tuned")


def _check_library(fn, library):
    if library not in GEMM_LIBRARIES:
        raise ValueError(f"{fn}: gemm must be one of {GEMM_LIBRARIES}, got {library!r}")


def matmul_forward(out, inp, weight, bias=None, gemm_library="cublas"):
    """gemm_library "cublaslt": the GEMM and the bias add in one cuBLASLt call (its bias
    epilogue: one rounding), llmcu/cuda/cublaslt.py; "cublas": cuBLAS, then the bias kernel."""
    _check_library("matmul_forward", gemm_library)
    be = backend_of(inp)
    N, C, OC, floatX = _check("matmul_forward", be, inp, weight, out=out, bias=bias)
    if gemm_library in LT:
        lt_matmul(out.reshape(N, OC), inp.reshape(N, C), weight, transpose_b=True, bias=bias,
                  tune=gemm_library in TUNED)
        return
    gemm(out.reshape(N, OC), inp.reshape(N, C), weight, transpose_b=True)
    if bias is not None:
        grid, block = launch_config(N * OC)
        be.launch("matmul", "matmul_bias_forward_kernel1", grid, block,
                  (out, bias, i32(N), i32(OC)), floatX=floatX)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, accumulate_weight=True, version=2,
                    gemm_library="cublas", bias_epilogue=False):
    """gemm_library "cublaslt_all" (or "cublaslt_all_tuned"): dinp's GEMM, and dweight's when
    it overwrites, on cuBLASLt (GEMM_LIBRARIES); otherwise cuBLAS. bias_epilogue=True: where
    dweight's GEMM is that cuBLASLt one (it overwrites), dbias comes from the same GEMM
    (cuBLASLt's BGRADB epilogue: dout's column sums while it streams dout, fp32, one
    rounding) instead of the bias kernels' second pass over dout; elsewhere the kernels run.
    Not measured on a GPU yet."""
    if version not in BIAS_BACKWARD_VERSIONS:
        raise ValueError(f"matmul_backward: version must be one of {BIAS_BACKWARD_VERSIONS}, "
                         f"got {version!r}")
    _check_library("matmul_backward", gemm_library)
    be = backend_of(inp)
    N, C, OC, floatX = _check("matmul_backward", be, inp, weight, dinp=dinp, dweight=dweight,
                              dbias=dbias, dout=dout)
    dout2, inp2 = dout.reshape(N, OC), inp.reshape(N, C)
    lt, tune = gemm_library in LT_ALL, gemm_library in TUNED
    if dinp is not None:
        if lt:
            lt_matmul(dinp.reshape(N, C), dout2, weight, tune=tune)
        else:
            gemm(dinp.reshape(N, C), dout2, weight)
    # accumulate_weight=False (the first backward after zero_grad): dweight and dbias are
    # overwritten, so the GEMM writes dweight directly (bf16: no fp32 temporary + add pass)
    if lt and not accumulate_weight:
        fused_bias = bias_epilogue and dbias is not None
        lt_matmul(dweight, dout2, inp2, transpose_a=True, tune=tune, a_row_sums=dbias if fused_bias else None)
        if fused_bias:
            return
    else:
        gemm(dweight, dout2, inp2, transpose_a=True, accumulate=accumulate_weight)
    if dbias is not None:
        matmul_bias_backward(dbias, dout, accumulate=accumulate_weight, version=version)


def matmul_gelu_forward(out, pre, inp, weight, bias=None, gemm_library="cublaslt"):
    """pre = inp @ weight.T + bias, out = gelu(pre): GPT-2's fc layer and its GELU. "cublaslt":
    one GEMM with cuBLASLt's GELU_AUX_BIAS epilogue (the GELU of the fp32 pre-activation;
    pre rounded once); "cublas": matmul_forward, then gelu_forward."""
    _check_library("matmul_gelu_forward", gemm_library)
    be = backend_of(inp)
    N, C, OC, _ = _check("matmul_gelu_forward", be, inp, weight, out=out, bias=bias)
    check_array("matmul_gelu_forward", "pre", pre, be, dtype=out.dtype, shape=out.shape)
    if gemm_library in LT:
        lt_matmul(out.reshape(N, OC), inp.reshape(N, C), weight, transpose_b=True, bias=bias,
                  gelu_aux=pre.reshape(N, OC), tune=gemm_library in TUNED)
        return
    matmul_forward(pre, inp, weight, bias)
    gelu_forward(out, pre, version="auto")


def matmul_dgelu_backward(dpre, dweight, dbias, dout, inp, weight, pre, accumulate_weight=True,
                          version=2, gemm_library="cublaslt", bias_epilogue=False):
    """matmul_backward of the layer after a GELU, whose input gradient then goes through the
    GELU's backward: dpre = (dout @ weight) * gelu'(pre) (the activation gradient is
    overwritten), dweight/dbias as matmul_backward. "cublaslt": dpre from one GEMM with
    cuBLASLt's DGELU epilogue; "cublas": the GEMM into a scratch buffer, then gelu_backward.
    bias_epilogue: as matmul_backward's."""
    _check_library("matmul_dgelu_backward", gemm_library)
    be = backend_of(inp)
    N, C, OC, _ = _check("matmul_dgelu_backward", be, inp, weight, dinp=dpre, dout=dout)
    check_array("matmul_dgelu_backward", "pre", pre, be, dtype=dpre.dtype, shape=dpre.shape)
    if gemm_library in LT:
        lt_matmul(dpre.reshape(N, C), dout.reshape(N, OC), weight, dgelu_aux=pre.reshape(N, C),
                  tune=gemm_library in TUNED)
    else:
        dact = runtime.scratch(be, "dgelu_input", dpre.shape, dpre.dtype)
        gemm(dact.reshape(N, C), dout.reshape(N, OC), weight)
        gelu_backward(dpre, dact, pre, version="auto")
    matmul_backward(None, dweight, dbias, dout, inp, weight, accumulate_weight, version,
                    gemm_library=gemm_library, bias_epilogue=bias_epilogue)


def matmul_bias_backward(dbias, dout, accumulate=True, version=2):
    """dbias += the column sums of dout (..., OC) (dbias = them with accumulate=False):
    the bias half of matmul_backward, on its own for benchmarks and tests."""
    fn = "matmul_bias_backward"
    if version not in BIAS_BACKWARD_VERSIONS:
        raise ValueError(f"{fn}: version must be one of {BIAS_BACKWARD_VERSIONS}, got {version!r}")
    be = backend_of(dout)
    dt = floatx_dtype(fn, "dout", dout)
    check_array(fn, "dout", dout, be, dtype=dt)
    OC = dout.shape[-1]
    N = dout.size // OC
    check_array(fn, "dbias", dbias, be, dtype=dt, shape=(OC,))
    floatX = FLOATX_NAMES[dt]
    if version == 1:
        if not accumulate:
            be.fill(dbias, 0)  # kernel 1 adds (+=) its column sums
        grid, block = launch_config(OC)
        be.launch("matmul", "matmul_bias_backward_kernel1", grid, block,
                  (dbias, dout, i32(N), i32(OC)), floatX=floatX)
        return
    # version 2: two deterministic passes (kernels/matmul.cu)
    vec = 16 // dout.dtype.itemsize  # x128::size
    wide = vectorizable(OC, dict(dout=dout))
    width = WARP * (vec if wide else 1)  # columns per block
    (tiles,), (block,) = runtime.column_tiles(OC, width)
    warps = block // WARP
    rows = runtime.partial_sums_grid(N, warps, max(1, runtime.PARTIAL_SUM_BLOCKS // tiles))
    scratch = runtime.partial_sums_scratch(be, (rows, OC))
    be.launch("matmul", "matmul_bias_backward_kernel2", (tiles, rows), (block,),
              (scratch, dout, i32(N), i32(OC), i32(wide)), shared_mem=warps * width * 4, floatX=floatX)
    grid, block = runtime.column_tiles(OC)
    be.launch("matmul", "matmul_bias_backward_reduce_kernel2", grid, block,
              (dbias, scratch, i32(rows), i32(OC), i32(bool(accumulate))), floatX=floatX)

