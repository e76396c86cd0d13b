"""LayerNorm on the kernels of kernels/layernorm.cu.

Same functions and signatures as llmcu/cpu/layernorm.py. Shapes: inp/out
(...,C) seen as N rows, weight/bias (C,), mean/rstd (...) float32.
Parameter gradients accumulate (+=); activation gradients overwrite (=).
"""

from .runtime import backend_of, check_array, f32, i32, launch_config, warp_per_row

EPS = 1e-5


def _rows(fn, be, inp, **named):
    check_array(fn, "inp", inp, be)
    C = inp.shape[-1]
    N = inp.size // C
    for name, (a, shape) in named.items():
        check_array(fn, name, a, be, shape={"row": inp.shape, "stat": inp.shape[:-1], "C": (C,)}[shape])
    return N, C


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=EPS):
    be = backend_of(inp)
    N, C = _rows("layernorm_forward", be, inp, out=(out, "row"), mean=(mean, "stat"),
                 rstd=(rstd, "stat"), weight=(weight, "C"), bias=(bias, "C"))
    grid, block = warp_per_row(N)
    be.launch("layernorm", "layernorm_forward_kernel1", grid, block,
              (out, mean, rstd, inp, weight, bias, i32(N), i32(C), f32(eps)))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    be = backend_of(inp)
    N, C = _rows("layernorm_backward", be, inp, dinp=(dinp, "row"), dout=(dout, "row"),
                 dweight=(dweight, "C"), dbias=(dbias, "C"), weight=(weight, "C"),
                 mean=(mean, "stat"), rstd=(rstd, "stat"))
    grid, block = warp_per_row(N)
    be.launch("layernorm", "layernorm_backward_kernel1", grid, block,
              (dinp, dout, inp, weight, mean, rstd, i32(N), i32(C)))
    grid, block = launch_config(C)
    be.launch("layernorm", "layernorm_param_backward_kernel1", grid, block,
              (dweight, dbias, dout, inp, mean, rstd, i32(N), i32(C)))
