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
"""

from .gemm import gemm
from .runtime import FLOATX_NAMES, backend_of, check_array, floatx_dtype, i32, launch_config


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
    be = backend_of(inp)
    N, C, OC, floatX = _check("matmul_forward", be, inp, weight, out=out, bias=bias)
    gemm(out.reshape(N, OC), inp.reshape(N, C), weight, transpose_b=True)
    if bias is not None:
        grid, block = launch_config(N * OC)
        be.launch("matmul", "matmul_bias_forward_kernel1", grid, block,
                  (out, bias, i32(N), i32(OC)), floatX=floatX)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    be = backend_of(inp)
    N, C, OC, floatX = _check("matmul_backward", be, inp, weight, dinp=dinp, dweight=dweight,
                              dbias=dbias, dout=dout)
    dout2, inp2 = dout.reshape(N, OC), inp.reshape(N, C)
    if dinp is not None:
        gemm(dinp.reshape(N, C), dout2, weight)
    gemm(dweight, dout2, inp2, transpose_a=True, accumulate=True)
    if dbias is not None:
        grid, block = launch_config(OC)
        be.launch("matmul", "matmul_bias_backward_kernel1", grid, block,
                  (dbias, dout, i32(N), i32(OC)), floatX=floatX)
