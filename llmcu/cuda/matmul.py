"""Linear layer out = inp @ weight.T + bias: the GEMMs through cuBLASLt (forward, with the
bias and GELU epilogues, llmcu/cuda/cublaslt.py) and cuBLAS (the backward GEMMs,
llmcu/cuda/gemm.py), the bias gradient on kernels/matmul.cu. Under the emulator the
same calls run in NumPy with the same arithmetic (product and epilogue in fp32, one
rounding), so the step's sequence of calls is the GPU's.

Same functions and signatures as llmcu/cpu/matmul.py. Shapes: inp (...,C),
weight (OC,C), bias (OC,) or None, out (...,OC). Parameter gradients
accumulate (+=); activation gradients overwrite (=). Arrays are floatX:
float32, or uint16 holding bf16 (the dtype of inp picks the build).

Measured on an H200 (2026-11-28, bf16 d12 B=16 T=1024, benchmarks/RESULTS.md "GPU
pass 3"): 37.8 ms a step with the cuBLASLt epilogues against 42.0 ms with cuBLAS and
separate bias and GELU kernels (the bias kernels are in the lab: benchmarks/lab.py
matmul; the GELU kernels: benchmarks/lab.py gelu).

bf16 rounding, per output element: out one rounding (the bias added in fp32 by the
epilogue); dinp one; dweight one (an accumulating GEMM adds the old dweight in fp32,
gemm's accumulate); dbias one (fp32 column sums, then +=).
matmul_backward(..., accumulate_weight=False) overwrites dweight and dbias (=)
instead, as llmcu/cpu/matmul.py (the first backward after zero_grad).

The bias gradient: two passes, deterministic: blocks of 32 columns x a slice of the
rows write fp32 partial column sums (16-byte loads when OC % (16 // itemsize) == 0 and
dout is 16-byte aligned) to a scratch buffer, and a second kernel sums them in a fixed
order into dbias.
"""

from . import runtime
from .cublaslt import lt_matmul
from .gemm import gemm
from .runtime import FLOATX_NAMES, WARP, backend_of, check_array, floatx_dtype, i32
from .vectorized import vectorizable


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


def matmul_forward(out, inp, weight, bias=None):
    """The GEMM and the bias add in one cuBLASLt call (its bias epilogue: one rounding)."""
    be = backend_of(inp)
    N, C, OC, _ = _check("matmul_forward", be, inp, weight, out=out, bias=bias)
    lt_matmul(out.reshape(N, OC), inp.reshape(N, C), weight, transpose_b=True, bias=bias)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, accumulate_weight=True):
    """dinp = dout @ weight (cuBLAS; skipped when dinp is None), dweight += dout^T @ inp
    (= with accumulate_weight=False: the GEMM writes dweight directly, in bf16 without an
    fp32 temporary and add pass), dbias += the column sums of dout (the bias kernels)."""
    be = backend_of(inp)
    N, C, OC, _ = _check("matmul_backward", be, inp, weight, dinp=dinp, dweight=dweight,
                         dbias=dbias, dout=dout)
    dout2, inp2 = dout.reshape(N, OC), inp.reshape(N, C)
    if dinp is not None:
        gemm(dinp.reshape(N, C), dout2, weight)
    gemm(dweight, dout2, inp2, transpose_a=True, accumulate=accumulate_weight)
    if dbias is not None:
        matmul_bias_backward(dbias, dout, accumulate=accumulate_weight)


def matmul_gelu_forward(out, pre, inp, weight, bias=None):
    """pre = inp @ weight.T + bias, out = gelu(pre): GPT-2's fc layer and its GELU in one GEMM
    with cuBLASLt's GELU_AUX_BIAS epilogue (the GELU of the fp32 pre-activation; pre
    rounded once)."""
    be = backend_of(inp)
    N, C, OC, _ = _check("matmul_gelu_forward", be, inp, weight, out=out, bias=bias)
    check_array("matmul_gelu_forward", "pre", pre, be, dtype=out.dtype, shape=out.shape)
    lt_matmul(out.reshape(N, OC), inp.reshape(N, C), weight, transpose_b=True, bias=bias,
              gelu_aux=pre.reshape(N, OC))


def matmul_dgelu_backward(dpre, dweight, dbias, dout, inp, weight, pre, accumulate_weight=True):
    """matmul_backward of the layer after a GELU, whose input gradient then goes through the
    GELU's backward: dpre = (dout @ weight) * gelu'(pre) from one GEMM with cuBLASLt's DGELU
    epilogue (the activation gradient is overwritten), dweight/dbias as matmul_backward."""
    be = backend_of(inp)
    N, C, OC, _ = _check("matmul_dgelu_backward", be, inp, weight, dinp=dpre, dout=dout)
    check_array("matmul_dgelu_backward", "pre", pre, be, dtype=dpre.dtype, shape=dpre.shape)
    lt_matmul(dpre.reshape(N, C), dout.reshape(N, OC), weight, dgelu_aux=pre.reshape(N, C))
    matmul_backward(None, dweight, dbias, dout, inp, weight, accumulate_weight)


def _check_bias_backward(dbias, dout):
    """matmul_bias_backward's argument checks: (backend, N rows, OC columns, floatX name)."""
    fn = "matmul_bias_backward"
    be = backend_of(dout)
    dt = floatx_dtype(fn, "dout", dout)
    check_array(fn, "dout", dout, be, dtype=dt)
    OC = dout.shape[-1]
    N = dout.size // OC
    check_array(fn, "dbias", dbias, be, dtype=dt, shape=(OC,))
    return be, N, OC, FLOATX_NAMES[dt]


def matmul_bias_backward(dbias, dout, accumulate=True):
    """dbias += the column sums of dout (..., OC) (dbias = them with accumulate=False):
    the bias half of matmul_backward, two deterministic passes (kernels/matmul.cu)."""
    be, N, OC, floatX = _check_bias_backward(dbias, dout)
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
