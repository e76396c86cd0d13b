"""Linear layer out = inp @ weight.T + bias: GEMMs through the array library
(cuBLAS via CuPy on the GPU, NumPy's BLAS under emulation), bias kernels from
kernels/matmul.cu.

Same functions and signatures as llmcu/cpu/matmul.py. Shapes: inp (...,C),
weight (OC,C), bias (OC,) or None, out (...,OC). Parameter gradients
accumulate (+=); activation gradients overwrite (=).
"""

from .runtime import backend_of, check_array, i32, launch_config


def _check(fn, be, inp, weight, **named):
    check_array(fn, "inp", inp, be)
    check_array(fn, "weight", weight, be)
    C = inp.shape[-1]
    N = inp.size // C
    if weight.ndim != 2 or weight.shape[1] != C:
        raise ValueError(f"{fn}: weight must be (OC,{C}), got {weight.shape}")
    OC = weight.shape[0]
    shapes = {"out": (*inp.shape[:-1], OC), "dout": (*inp.shape[:-1], OC), "dinp": inp.shape,
              "bias": (OC,), "dbias": (OC,), "dweight": (OC, C)}
    for name, a in named.items():
        if a is not None:
            check_array(fn, name, a, be, shape=shapes[name])
    return N, C, OC


def matmul_forward(out, inp, weight, bias=None):
    be = backend_of(inp)
    N, C, OC = _check("matmul_forward", be, inp, weight, out=out, bias=bias)
    xp = be.xp
    xp.matmul(inp.reshape(N, C), weight.T, out=out.reshape(N, OC))
    if bias is not None:
        grid, block = launch_config(N * OC)
        be.launch("matmul", "matmul_bias_forward_kernel1", grid, block, (out, bias, i32(N), i32(OC)))


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    be = backend_of(inp)
    N, C, OC = _check("matmul_backward", be, inp, weight, dinp=dinp, dweight=dweight,
                      dbias=dbias, dout=dout)
    xp = be.xp
    dout2, inp2 = dout.reshape(N, OC), inp.reshape(N, C)
    if dinp is not None:
        xp.matmul(dout2, weight, out=dinp.reshape(N, C))
    dweight += dout2.T @ inp2
    if dbias is not None:
        grid, block = launch_config(OC)
        be.launch("matmul", "matmul_bias_backward_kernel1", grid, block, (dbias, dout, i32(N), i32(OC)))
