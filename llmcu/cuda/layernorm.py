"""LayerNorm on the kernels of kernels/layernorm.cu.

Same functions and signatures as llmcu/cpu/layernorm.py. Shapes: inp/out
(...,C) seen as N rows, weight/bias (C,), mean/rstd (...) float32.
Parameter gradients accumulate (+=); activation gradients overwrite (=).

layernorm_forward takes one keyword the CPU version lacks, version=, choosing
the kernel (see the top of kernels/layernorm.cu and docs/layernorm.md):
  0: one thread per row (the teaching version, slow);
  1: one warp per row, scalar loads (the default);
  2: one warp per row, 16-byte loads and stores; needs C % 4 == 0 and
     16-byte aligned inp, out, weight and bias.
"""

from .runtime import backend_of, check_array, f32, i32, launch_config, warp_per_row

EPS = 1e-5
FORWARD_VERSIONS = (0, 1, 2)
VEC = 4  # floats per 16-byte packet (x128::size for floatX = float)


def _rows(fn, be, inp, **named):
    check_array(fn, "inp", inp, be)
    C = inp.shape[-1]
    N = inp.size // C
    for name, (a, shape) in named.items():
        check_array(fn, name, a, be, shape={"row": inp.shape, "stat": inp.shape[:-1], "C": (C,)}[shape])
    return N, C


def _address(a) -> int:
    """The device (cupy) or host (numpy) address of a's first element."""
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=EPS, version=1):
    if version not in FORWARD_VERSIONS:
        raise ValueError(f"layernorm_forward: version must be one of {FORWARD_VERSIONS}, got {version!r}")
    be = backend_of(inp)
    N, C = _rows("layernorm_forward", be, inp, out=(out, "row"), mean=(mean, "stat"),
                 rstd=(rstd, "stat"), weight=(weight, "C"), bias=(bias, "C"))
    if version == 2:
        if C % VEC != 0:
            raise ValueError(f"layernorm_forward: version 2 (16-byte loads) needs C % {VEC} == 0, "
                             f"got C = {C}; use version=1")
        for name, a in (("out", out), ("inp", inp), ("weight", weight), ("bias", bias)):
            if _address(a) % 16 != 0:
                raise ValueError(f"layernorm_forward: version 2 needs {name} 16-byte aligned, "
                                 f"got address {_address(a):#x}; pass a fresh array or use version=1")
    grid, block = launch_config(N) if version == 0 else warp_per_row(N)
    be.launch("layernorm", f"layernorm_forward_kernel{version}", grid, block,
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
