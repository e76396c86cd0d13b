"""The gelu lab's launch code: the versions of kernels/dev/gelu.cu behind the oracle's
signatures (llmcu/cpu/gelu.py). The product has no GELU kernel: the training step runs
the GELU and its gradient as cuBLASLt epilogues of the fc GEMMs (llmcu/cuda/matmul.py).

    gelu_forward(out, inp)
    gelu_backward(dinp, dout, inp)

Any shape; floatX arrays (float32, or uint16 bf16 bits: inp's dtype picks the build).
Activation gradients overwrite (=).

  1: one element per thread, tanhf (the readable one);
  2: one 16-byte packet per thread (x128: 4 floats or 8 bf16); needs inp.size %
     (16 // itemsize) == 0 and 16-byte aligned arrays. The same arithmetic per element.
Load by path (kernels/dev/ is not a package): benchmarks/lab.py, tests/lab/.
"""

from llmcu.cuda.runtime import FLOATX_NAMES, backend_of, check_array, floatx_dtype, i32, launch_config
from llmcu.cuda.vectorized import check_vectorized
from llmcu.lab import Version

STEM = "dev/gelu"


def _prepare(fn, version, inp, **named):
    be = backend_of(inp)
    dt = floatx_dtype(fn, "inp", inp)
    check_array(fn, "inp", inp, be, dtype=dt)
    for name, a in named.items():
        check_array(fn, name, a, be, dtype=dt, shape=inp.shape)
    threads = inp.size if version == 1 else check_vectorized(fn, inp.size, dict(inp=inp, **named))
    grid, block = launch_config(threads)
    return be, grid, block, FLOATX_NAMES[dt]


def _forward(version, out, inp):
    be, grid, block, floatX = _prepare("gelu_forward", version, inp, out=out)
    be.launch(STEM, f"gelu_forward_kernel{version}", grid, block, (out, inp, i32(inp.size)), floatX=floatX)


def _backward(version, dinp, dout, inp):
    be, grid, block, floatX = _prepare("gelu_backward", version, inp, dinp=dinp, dout=dout)
    be.launch(STEM, f"gelu_backward_kernel{version}", grid, block, (dinp, inp, dout, i32(inp.size)),
              floatX=floatX)


def gelu_forward1(out, inp):
    _forward(1, out, inp)


def gelu_backward1(dinp, dout, inp):
    _backward(1, dinp, dout, inp)


def gelu_forward2(out, inp):
    _forward(2, out, inp)


def gelu_backward2(dinp, dout, inp):
    _backward(2, dinp, dout, inp)


VERSIONS = {
    1: Version("one element per thread, tanhf", {"gelu_forward": gelu_forward1, "gelu_backward": gelu_backward1},
               kernels=("gelu_forward_kernel1", "gelu_backward_kernel1")),
    2: Version("one 16-byte packet per thread (N % (16/itemsize) == 0, aligned)",
               {"gelu_forward": gelu_forward2, "gelu_backward": gelu_backward2},
               kernels=("gelu_forward_kernel2", "gelu_backward_kernel2")),
}
