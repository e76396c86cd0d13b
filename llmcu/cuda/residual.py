"""Residual connection out = inp1 + inp2 on kernels/residual.cu.

Same functions and signatures as llmcu/cpu/residual.py. out may alias inp1.
Arrays are floatX: float32, or uint16 holding bf16 (the dtype of inp1 picks the build).

One keyword the CPU version lacks, version=:
  1: one element per thread (the default, the readable one);
  2: 16-byte loads and stores (x128); needs inp1.size % (16 // itemsize) == 0
     and 16-byte aligned arrays;
  "auto": 2 where it applies, else 1 (what the GPT-2 kernel model uses).
"""

from .runtime import FLOATX_NAMES, backend_of, check_array, floatx_dtype, i32, launch_config
from .vectorized import check_vectorized, vectorizable

VERSIONS = (1, 2)


def residual_forward(out, inp1, inp2, version=1):
    fn = "residual_forward"
    if version not in VERSIONS + ("auto",):
        raise ValueError(f"{fn}: version must be one of {VERSIONS} or 'auto', got {version!r}")
    be = backend_of(inp1)
    dt = floatx_dtype(fn, "inp1", inp1)
    for name, a in (("out", out), ("inp1", inp1), ("inp2", inp2)):
        check_array(fn, name, a, be, dtype=dt, shape=inp1.shape)
    threads = inp1.size
    if version == "auto":
        version = 2 if vectorizable(inp1.size, dict(out=out, inp1=inp1, inp2=inp2)) else 1
    if version == 2:
        threads = check_vectorized(fn, inp1.size, dict(out=out, inp1=inp1, inp2=inp2))
    grid, block = launch_config(threads)
    be.launch("residual", f"residual_forward_kernel{version}", grid, block,
              (out, inp1, inp2, i32(inp1.size)), floatX=FLOATX_NAMES[dt])


def residual_backward(dinp1, dinp2, dout):
    """Both inputs receive dout (copies; no kernel needed)."""
    dinp1[...] = dout
    dinp2[...] = dout
