"""GELU (tanh approximation) on the kernels of kernels/gelu.cu.

Same functions and signatures as llmcu/cpu/gelu.py. Activation gradients overwrite (=).
Arrays are floatX: float32, or uint16 holding bf16 (the dtype of inp picks the build).

One keyword the CPU version lacks, version=:
  1: one element per thread (the default, the readable one);
  2: 16-byte loads and stores (x128: 4 floats or 8 bf16 per thread); needs
     inp.size % (16 // itemsize) == 0 and 16-byte aligned arrays;
  "auto": 2 where it applies, else 1 (what the GPT-2 kernel model uses: on an
     H200, 2026-11-28, version 2 moved 72-76% of the copy bandwidth in fp32 and
     44-56% in bf16 against 52-63% and 28-35% for version 1).
"""

from .runtime import FLOATX_NAMES, backend_of, check_array, floatx_dtype, i32, launch_config
from .vectorized import check_vectorized, vectorizable

VERSIONS = (1, 2)


def _prepare(fn, version, inp, **named):
    if version not in VERSIONS + ("auto",):
        raise ValueError(f"{fn}: version must be one of {VERSIONS} or 'auto', got {version!r}")
    be = backend_of(inp)
    dt = floatx_dtype(fn, "inp", inp)
    check_array(fn, "inp", inp, be, dtype=dt)
    for name, a in named.items():
        check_array(fn, name, a, be, dtype=dt, shape=inp.shape)
    threads = inp.size
    if version == "auto":
        version = 2 if vectorizable(inp.size, dict(inp=inp, **named)) else 1
    if version == 2:
        threads = check_vectorized(fn, inp.size, dict(inp=inp, **named))
    grid, block = launch_config(threads)
    return be, grid, block, FLOATX_NAMES[dt], version


def gelu_forward(out, inp, version=1):
    be, grid, block, floatX, version = _prepare("gelu_forward", version, inp, out=out)
    be.launch("gelu", f"gelu_forward_kernel{version}", grid, block, (out, inp, i32(inp.size)),
              floatX=floatX)


def gelu_backward(dinp, dout, inp, version=1):
    be, grid, block, floatX, version = _prepare("gelu_backward", version, inp, dinp=dinp, dout=dout)
    be.launch("gelu", f"gelu_backward_kernel{version}", grid, block,
              (dinp, inp, dout, i32(inp.size)), floatX=floatX)
