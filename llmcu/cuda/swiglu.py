"""SwiGLU and GeGLU on the kernels of kernels/swiglu.cu.

Same functions and signatures as llmcu/cpu/swiglu.py. Shapes: inp/dinp
(...,2H) = [gate | up], out/dout (...,H). Activation gradients overwrite (=).
All arrays are floatX (float32, or uint16 holding bf16: the dtype of inp
picks the build).
"""

from .runtime import FLOATX_NAMES, backend_of, check_array, floatx_dtype, i32, launch_config


def _check(fn, inp, **named):
    be = backend_of(inp)
    dt = floatx_dtype(fn, "inp", inp)
    check_array(fn, "inp", inp, be, dtype=dt)
    if inp.ndim < 1 or inp.size == 0 or inp.shape[-1] % 2 != 0:
        raise ValueError(f"{fn}: inp must be (..., 2*H) with H > 0 (gate then up), got shape {inp.shape}")
    H = inp.shape[-1] // 2
    shapes = {"half": inp.shape[:-1] + (H,), "full": inp.shape}
    for name, (a, kind) in named.items():
        check_array(fn, name, a, be, dtype=dt, shape=shapes[kind])
    return be, inp.size // (2 * H), H, FLOATX_NAMES[dt]


def _forward(act, out, inp):
    fn = f"{act}_forward"
    be, N, H, floatX = _check(fn, inp, out=(out, "half"))
    grid, block = launch_config(N * H)
    be.launch("swiglu", f"{act}_forward_kernel1", grid, block, (out, inp, i32(N), i32(H)),
              floatX=floatX)


def _backward(act, dinp, dout, inp):
    fn = f"{act}_backward"
    be, N, H, floatX = _check(fn, inp, dinp=(dinp, "full"), dout=(dout, "half"))
    grid, block = launch_config(N * H)
    be.launch("swiglu", f"{act}_backward_kernel1", grid, block, (dinp, dout, inp, i32(N), i32(H)),
              floatX=floatX)


def swiglu_forward(out, inp):
    _forward("swiglu", out, inp)


def swiglu_backward(dinp, dout, inp):
    _backward("swiglu", dinp, dout, inp)


def geglu_forward(out, inp):
    _forward("geglu", out, inp)


def geglu_backward(dinp, dout, inp):
    _backward("geglu", dinp, dout, inp)
